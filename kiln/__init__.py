"""kiln: an ahead-of-time compiler for ONNX neural networks.

    import kiln
    graph = kiln.load("model.onnx")                   # ONNX -> kiln IR
    print(graph)                                      # readable text, one line per node
    graph, report = kiln.optimize(graph, "O2")        # kiln's passes, to a fixed point
    kiln.save_onnx(graph, "out.onnx")                 # kiln IR -> ONNX
    kiln.compile("model.onnx", "model.kiln")          # the whole pipeline: what `kiln compile` runs

The public names are imported lazily, so that ``import kiln.runtime`` (which
must stay free of onnx and the TVM compiler) does not pull in the compiler side.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("kiln.ir.onnx_io", "load"),
    "optimize": ("kiln.driver", "optimize"),
    "compile": ("kiln.driver", "compile"),
    "save_onnx": ("kiln.ir.onnx_io", "save_onnx"),
    "to_onnx": ("kiln.ir.serde", "to_onnx"),
    "evaluate": ("kiln.ir.interpreter", "evaluate"),
    "Graph": ("kiln.ir.core", "Graph"),
    "Node": ("kiln.ir.core", "Node"),
    "Value": ("kiln.ir.core", "Value"),
    "Tensor": ("kiln.ir.core", "Tensor"),
    "DType": ("kiln.ir.dtypes", "DType"),
    "KilnError": ("kiln.errors", "KilnError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
