"""Code generation through Apache TVM: kiln IR in, a compiled ``.kiln`` artifact out.

:mod:`.lowering` turns a graph into a Relax module of TE prim funcs (the lowering table, the
lowerer, one module per op family); :mod:`.schedule` gives each prim func kiln's default CPU
schedule (the VNNI int8 kernels and their schedules are in :mod:`.int8`); :mod:`.tune` searches
better schedules with MetaSchedule into an on-disk database; :mod:`.build` compiles for a
:mod:`.target` and writes the artifact; :mod:`.baseline` is TVM's own pipeline, for benchmarks.
Only this package imports the TVM compiler, and always inside functions: ``import tvm`` takes seconds.
"""

from __future__ import annotations
