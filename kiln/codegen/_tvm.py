"""The one place kiln imports the TVM compiler (``import tvm`` takes seconds; do it lazily)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def valid_llvm_cpus(names: tuple[str, ...]) -> frozenset[str]:
    """Those of ``names`` that this TVM's LLVM accepts as a CPU for the host triple."""
    from tvm.target import codegen

    triple = codegen.llvm_get_system_triple()
    return frozenset(name for name in names if codegen.llvm_is_valid_cpu(name, triple))
