"""Compression jobs: int8 quantization (calibration, observers, accuracy reports, sensitivity and
budgets) and structured pruning (``compile_pruned``, standing on :mod:`kiln.passes.prune`).

Dynamic int8 (``--quantize int8-dynamic``) is :func:`compile_int8_dynamic`.
``kiln compile MODEL --quantize int8 --calib SAMPLES.npz`` and ``kiln.compile(...,
quantize=QuantizeOptions(...))`` run :func:`compile_int8`, which calibrates the float model
and builds through the compile driver (:mod:`kiln.driver`). The graph rewrite itself (Q/DQ
insertion) is the ``quantize`` pass in :mod:`kiln.passes.quantize`.
"""

from __future__ import annotations

from kiln.quantize.accuracy import Budget, OutputAccuracy, compare, format_accuracy
from kiln.quantize.calibration import METHODS, Observer, read_samples
from kiln.quantize.dynamic import compile_int8_dynamic
from kiln.quantize.options import DynamicQuantizeOptions, PruneOptions, QuantizeError, QuantizeOptions
from kiln.quantize.pruning import compile_pruned
from kiln.quantize.static import LayerSensitivity, QuantizeSession, compile_int8, format_sensitivity

__all__ = [
    "METHODS", "Budget", "DynamicQuantizeOptions", "compile_int8_dynamic", "LayerSensitivity", "Observer", "OutputAccuracy", "PruneOptions", "QuantizeError",
    "QuantizeOptions", "compile_pruned",
    "QuantizeSession", "compare", "compile_int8", "format_accuracy", "format_sensitivity", "read_samples",
]
