"""Lowering kiln IR to Relax/TE: the lowering table, the lowerer, and one module per op family.

- :mod:`.registry`: the table (:data:`LOWERINGS`, filled by :func:`lowers`), the checks of inputs
  that fail only at run time, :class:`CodegenError`, and the graph queries that read the table
  (:func:`needed_nodes`, :func:`uncompilable`, ...). It imports no TVM.
- :mod:`.lowerer`: :class:`Lowerer`, which builds the Relax module node by node, and :func:`lower`.
- :mod:`.te`: TE/TIR helpers that more than one family uses.
- one module per op family (:mod:`.elementwise`, :mod:`.conv`, :mod:`.pool`, :mod:`.matmul`, ...):
  each op's lowering and its ``@lowers(...)`` registration. Importing this package imports every
  family, and that is what fills the table; adding an op touches one family module.
"""

from __future__ import annotations

from kiln.codegen.lowering import (  # noqa: F401 - each family registers its lowerings on import
    attention, blocked, control, conv, detection, elementwise, generate, image, indexing, loop, matmul,
    normalization, pool, quantize, recurrent_attention, reduce, rnn, sequence, shape, softmax, spectral,
)
from kiln.codegen.lowering.lowerer import Lowered, Lowerer, lower
from kiln.codegen.lowering.registry import (
    DATA_INPUTS, LOWERINGS, PREPACKS, RUN_TIME_FAILURES, CodegenError, branch_failure, compiled_graphs, lowers,
    needed_nodes, prepacks, run_time_failure, uncompilable,
)

__all__ = [
    "DATA_INPUTS", "LOWERINGS", "PREPACKS", "RUN_TIME_FAILURES", "CodegenError", "Lowered", "Lowerer", "branch_failure",
    "compiled_graphs", "lower", "lowers", "needed_nodes", "prepacks", "run_time_failure", "uncompilable",
]
