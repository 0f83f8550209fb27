"""What a quantization job was asked for, and the error it raises for requests it cannot carry out."""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.quantize.accuracy import Budget


class QuantizeError(KilnError):
    """A quantization request kiln cannot carry out (bad samples, names, budget)."""


@dataclass
class QuantizeOptions:
    """What ``kiln compile --quantize int8`` was asked for."""

    calib: str
    method: str = "minmax"
    per_channel: bool = True
    symmetric: bool = False
    exclude: tuple[str, ...] = ()
    eval: str | None = None
    sensitivity: bool = False
    observer: str = "auto"  # auto | compiled | evaluator
    budget: Budget | None = None  # keep the most sensitive layers in float until it holds (implies sensitivity)


@dataclass
class DynamicQuantizeOptions:
    """What ``kiln compile --quantize int8-dynamic`` was asked for (no calibration samples)."""

    eval: str | None = None  # samples for the accuracy report against the float model


@dataclass
class PruneOptions:
    """What ``kiln compile --prune-channels RATIO`` was asked for."""

    ratio: float  # the share of the model's MACs to remove
    norm: str = "l1"  # how a channel's importance is measured: l1 or l2 of its filters
    eval: str | None = None  # held-out samples for the accuracy report against the unpruned model
    budget: Any = None  # a kiln.quantize.accuracy.Budget: sensitive groups are kept whole until it holds
    calib: str | None = None  # the samples the budget is measured on (with budget)
