"""TVM's own pipeline as a benchmark baseline: ``from_onnx`` + the default ``tvm.compile``, untuned."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kiln.codegen.target import cpu_target


def tvm_pipeline(model_path: str, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    """Compile ``model_path`` the way TVM does on its own; return a function that runs it once."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from kiln.ir.onnx_io import read_model

    proto, _ = read_model(model_path)
    mod = from_onnx(proto, shape_dict={k: list(v.shape) for k, v in feeds.items()})
    mod, params = relax.frontend.detach_params(mod)
    ex = tvm.compile(mod, target=tvm.target.Target(cpu_target(threads).tvm))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[k]) for k in feeds] + [tvm.runtime.tensor(p.numpy()) for p in params.get("main", [])]
    return lambda: vm["main"](*args)
