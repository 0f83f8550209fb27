"""Helpers around TVM's process-wide state: which LLVM CPU names this TVM accepts (for the target's
``mcpu``), and keeping the registration of tensor intrinsics to x86's, which saves MetaSchedule's
build workers most of their start-up. TVM is imported inside each function (it takes seconds)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator


def target_has(feature: str) -> bool:
    """Whether the current TVM target (``with target:``) has an LLVM CPU feature."""
    from tvm.target import Target, codegen

    target = Target.current(allow_none=True)
    return target is not None and bool(codegen.target_has_features(feature, target))


@functools.lru_cache(maxsize=None)
def valid_llvm_cpus(names: tuple[str, ...]) -> frozenset[str]:
    """Those of ``names`` that this TVM's LLVM accepts as a CPU for the host triple."""
    from tvm.target import codegen

    triple = codegen.llvm_get_system_triple()
    return frozenset(name for name in names if codegen.llvm_is_valid_cpu(name, triple))


# Tensor intrinsics for other targets. Importing tvm.s_tir.tensor_intrin registers every
# target's intrinsics by parsing TVMScript: about 27 s on 2 cores, 19 s of it CUDA's. MetaSchedule
# imports the package when it makes a tuning context and in every build worker.
FOREIGN_TENSOR_INTRINSICS = ("cuda", "rocm", "hexagon", "arm_cpu", "riscv_cpu")


def skip_foreign_tensor_intrinsics() -> list[str]:
    """Make this process register only x86's tensor intrinsics; the stubbed module names.

    For a process that builds only x86 code (a tuning build worker). It does nothing once
    the intrinsics are loaded. Inside a process that may build other code later, use
    :func:`x86_tensor_intrinsics_only`, which takes the stubs away again.
    """
    import sys
    import types

    package = "tvm.s_tir.tensor_intrin"
    if package in sys.modules:
        return []
    stubbed = []
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    for name in FOREIGN_TENSOR_INTRINSICS:
        full = f"{package}.{name}"
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)
            stubbed.append(full)
    return stubbed


@contextlib.contextmanager
def x86_tensor_intrinsics_only() -> Iterator[None]:
    """Within the block, loading the tensor intrinsics registers only x86's.

    Afterwards the stubs leave ``sys.modules``, so an explicit import of another target's
    intrinsics (as TVM's GPU rules do) loads the real module.
    """
    import sys

    stubbed = skip_foreign_tensor_intrinsics()
    try:
        yield
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)


def unroll_static(sch: Any, loop: Any) -> None:
    """Unroll ``loop`` if its extent is a constant. Under a symbolic dim a tile's tail can run a
    run-time number of times (``min(8, W - 8·wo)``), which TVM cannot unroll: it stays a loop."""
    extent = getattr(sch.get(loop).extent, "value", None)
    if isinstance(extent, int):
        sch.unroll(loop)
