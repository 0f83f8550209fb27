"""The one place kiln imports the TVM compiler (``import tvm`` takes seconds; do it lazily)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def valid_llvm_cpus() -> set[str]:
    """The CPU names this TVM's LLVM accepts for the host triple."""
    from tvm.target import codegen

    triple = codegen.llvm_get_system_triple()
    return {name for name, _ in _candidates() if codegen.llvm_is_valid_cpu(name, triple)}


def _candidates():
    from kiln.codegen.target import CPU_MODELS

    return CPU_MODELS
