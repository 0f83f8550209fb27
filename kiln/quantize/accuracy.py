"""How a quantized model's outputs compare with the float model's, and accuracy budgets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from kiln.quantize.options import QuantizeError


@dataclass
class OutputAccuracy:
    """How one output of the quantized model compares with the float model's."""

    name: str
    cosine: float  # mean over samples of each sample's cosine similarity
    cosine_min: float
    max_abs_error: float
    argmax_agreement: float | None  # fraction of rows (argmax over the last axis) that agree

    def to_json(self) -> dict[str, Any]:
        return {"cosine": round(self.cosine, 6), "cosine_min": round(self.cosine_min, 6),
                "max_abs_error": float(f"{self.max_abs_error:.6g}"),
                "argmax_agreement": None if self.argmax_agreement is None else round(self.argmax_agreement, 4)}


def compare(reference: Sequence[dict[str, np.ndarray]], got: Sequence[dict[str, np.ndarray]],
            names: Iterable[str]) -> list[OutputAccuracy]:
    """Per-output accuracy of ``got`` against ``reference`` over the same samples."""
    report = []
    for name in names:
        cos, err, agree, rows = [], 0.0, 0, 0
        for r, g in zip(reference, got):
            a, b = np.asarray(r[name], np.float64).ravel(), np.asarray(g[name], np.float64).ravel()
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cos.append(1.0 if na == 0 and nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
            err = max(err, float(np.abs(a - b).max(initial=0)))
            ra = np.asarray(r[name])
            if ra.ndim >= 1 and ra.shape[-1] > 1 and np.issubdtype(ra.dtype, np.floating):
                x, y = ra.reshape(-1, ra.shape[-1]), np.asarray(g[name]).reshape(-1, ra.shape[-1])
                agree += int((x.argmax(-1) == y.argmax(-1)).sum())
                rows += x.shape[0]
        report.append(OutputAccuracy(name, float(np.mean(cos)), float(np.min(cos)), err,
                                     agree / rows if rows else None))
    return report


@dataclass(frozen=True)
class Budget:
    """``argmax>=0.99`` or ``cosine>=0.999``: the worst output must reach ``value``."""

    metric: str
    value: float

    @staticmethod
    def parse(text: str) -> Budget:
        m = re.fullmatch(r"\s*(argmax|cosine)\s*(?:>=|≥)\s*([0-9.]+)\s*(%?)\s*", text)
        if not m:
            raise QuantizeError(f"accuracy budget '{text}': write argmax>=0.99 (or 99%) or cosine>=0.999")
        value = float(m.group(2)) / (100 if m.group(3) else 1)
        if not 0 < value <= 1:
            raise QuantizeError(f"accuracy budget '{text}': the value must be in (0, 1] (or a percentage)")
        return Budget(m.group(1), value)

    def score(self, report: list[OutputAccuracy]) -> float:
        if self.metric == "cosine":
            return min(r.cosine for r in report)
        values = [r.argmax_agreement for r in report if r.argmax_agreement is not None]
        if not values:
            raise QuantizeError("an argmax budget needs an output with a last axis longer than 1; use cosine>=X")
        return min(values)

    def holds(self, report: list[OutputAccuracy]) -> bool:
        return self.score(report) >= self.value

    def __str__(self) -> str:
        return f"{self.metric}>={self.value:g}"


def format_accuracy(report: list[OutputAccuracy]) -> str:
    lines = []
    for r in report:
        agree = "" if r.argmax_agreement is None else f", argmax agreement {100 * r.argmax_agreement:.1f}%"
        lines.append(f"  {r.name}: cosine {r.cosine:.5f} (min {r.cosine_min:.5f}), max abs error "
                     f"{r.max_abs_error:.4g}{agree}")
    return "\n".join(lines)


def against_source(model: Any, artifact: Any, samples: list[dict], target: Any) -> list[OutputAccuracy]:
    """``artifact`` run on ``samples`` against onnxruntime running the source ``model`` (float, unpruned)."""
    from kiln.ir.oracle import run_onnxruntime
    from kiln.runtime import load

    compiled = load(artifact, threads=target.threads)
    got = [compiled.run(feeds) for feeds in samples]
    want = [run_onnxruntime(str(model), feeds) for feeds in samples]
    return compare(want, got, [o.name for o in compiled.outputs])


def accuracy_record(model: Any, artifact: Any, samples: list[dict], target: Any) -> dict[str, Any]:
    """The manifest's ``accuracy`` (per output, :func:`against_source`) and ``accuracy_samples`` keys."""
    return {"accuracy": {a.name: a.to_json() for a in against_source(model, artifact, samples, target)},
            "accuracy_samples": len(samples)}

