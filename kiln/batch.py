"""``kiln batch``: an artifact over a file of samples, in this process or on a Ray cluster.

    kiln batch model.kiln --input samples.npz --output out.npz                  # this process
    kiln batch model.kiln --input samples.npz --output out.npz --actors 2       # a local Ray
    kiln batch model.kiln --input data/ --output preds/ --ray auto              # Parquet, on a cluster

Samples come keyed by input name with a leading sample axis (as ``kiln compile --calib``
takes them); outputs come back the same way, keyed by output name, in the samples' order.

- A model with a symbolic batch dim (``N``, leading in every input and output) runs
  ``--batch-size`` samples at a time; a sample is one row, shaped like the input past its
  batch dim.
- Any other model runs one sample at a time: a sample is a whole input, or, where the
  input's leading dim is 1, may leave that dim out (outputs then also come without it).

With ``--ray`` or ``--actors``, the samples go through a Ray Data ``map_batches`` over
:class:`kiln.ray.KilnPredictor` actors, each loading the artifact once. Parquet input and
output (one column per input or output, as Ray Data writes tensors) need Ray.

Deploy-only: it stands on :mod:`kiln.runtime` (and Ray, for the cluster), not on the compiler.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from kiln.errors import KilnError

if TYPE_CHECKING:  # numpy loads with the job, not with the CLI's parser, which imports this module
    import numpy as np

DEFAULT_BATCH_SIZE = 8
ROW_COLUMN = "__kiln_row"  # the job's own column that keeps the samples' order through Ray


class BatchError(KilnError):
    """The samples do not fit the model, or an input/output file cannot be used."""


@dataclass(frozen=True)
class BatchReport:
    """What a batch job did."""

    output: Path
    samples: int
    seconds: float
    actors: int  # 0: this process
    outputs: dict[str, tuple[int, ...]]  # output name -> shape written

    @property
    def samples_per_second(self) -> float:
        """Throughput over the whole job (loading included)."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def _sample_form(model: Any, columns: Mapping[str, np.ndarray], batchable: bool) -> tuple[int, bool]:
    """How many samples ``columns`` hold, and whether they are rows (along the model's leading dim)."""
    names = [s.name for s in model.inputs]
    missing = [n for n in names if n not in columns]
    if missing:
        raise BatchError(f"no samples for input(s) {', '.join(missing)}; the data has "
                         f"{', '.join(c for c in columns if c != ROW_COLUMN) or 'no columns'}")
    counts = {n: len(columns[n]) for n in names}
    if len(set(counts.values())) > 1:
        raise BatchError("inputs hold different numbers of samples: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    forms = set()
    for s in model.inputs:
        a, rank = columns[s.name], len(s.shape)
        if a.ndim == rank and rank and (batchable or s.shape[0] == 1):
            forms.add("rows")
        elif a.ndim == rank + 1 and not batchable:
            forms.add("whole")
        else:
            want = f"[S,{','.join(str(d) for d in s.shape[1:])}]" if batchable or (rank and s.shape[0] == 1) else \
                f"[S,{','.join(str(d) for d in s.shape)}]"
            raise BatchError(f"input '{s.name}': samples of shape {list(a.shape)} do not fit "
                             f"{s.dtype}[{','.join(str(d) for d in s.shape)}]; want {want} (S samples)")
    if len(forms) > 1:
        raise BatchError("give every input's samples the same way: all without the model's leading dim of 1, or all with it")
    return next(iter(counts.values()), 0), forms == {"rows"}


def run_samples(model: Any, columns: Mapping[str, np.ndarray], batch_size: int = DEFAULT_BATCH_SIZE
                ) -> dict[str, np.ndarray]:
    """Run ``model`` over samples (arrays keyed by input name, leading sample axis); outputs likewise.

    Columns that are not inputs of the model are passed through, so ids and labels stay beside
    the outputs.
    """
    import numpy as np

    from kiln.serve.batcher import batch_dim

    columns = {k: _as_array(v) for k, v in columns.items()}
    batchable = batch_dim(model.inputs, model.outputs) is not None
    count, rows = _sample_form(model, columns, batchable)
    names = [s.name for s in model.inputs]
    passed = {k: v for k, v in columns.items() if k not in names}
    step = batch_size if batchable else 1
    parts = [model.run({n: columns[n][i:i + step] if rows else columns[n][i] for n in names})
             for i in range(0, count, step)]
    outs = {}
    for s in model.outputs:  # rows join along the leading dim; whole samples (or outputs without a 1) stack
        join = np.concatenate if rows and (batchable or s.shape[:1] == (1,)) else np.stack
        outs[s.name] = join([p[s.name] for p in parts]) if parts else np.empty((0,), dtype=s.dtype)
    return {**outs, **passed}


def _as_array(column: Any) -> np.ndarray:
    """A column as one array: Parquet lists (object arrays of arrays) are stacked."""
    import numpy as np

    a = np.asarray(column)
    if a.dtype == object and a.size:
        try:
            return np.stack([np.asarray(v) for v in a])
        except ValueError:
            raise BatchError("a column holds ragged samples (lists of different lengths)") from None
    return a


def read_samples(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file of samples (no pickles)."""
    from kiln.runtime.npz import read_npz

    return read_npz(path, BatchError, "of samples")


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path`` atomically (a temp file beside it, then a rename)."""
    import numpy as np

    dst = Path(path)
    tmp = dst.with_name(f".{dst.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, dst)
    return dst


def _is_parquet(path: Path) -> bool:
    return path.suffix == ".parquet" or path.is_dir()


def run_batch(artifact: str | os.PathLike, input: str | os.PathLike, output: str | os.PathLike, *,
              ray_address: str | None = None, actors: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
              threads: int | None = None, trusted_keys: Sequence[str] | None = None) -> BatchReport:
    """Run ``artifact`` over the samples in ``input`` and write the outputs to ``output``.

    With neither ``ray_address`` nor ``actors`` (and npz in and out), it runs in this process;
    otherwise through Ray Data with ``actors`` actors (default 1), on the cluster at
    ``ray_address`` (``auto``, ``ray://HOST:10001``), or on a local Ray started for the job.
    """
    src, dst = Path(input), Path(output)
    if batch_size < 1:
        raise BatchError("--batch-size must be at least 1")
    if actors is not None and actors < 1:
        raise BatchError("--actors must be at least 1")
    if not src.exists():
        raise BatchError(f"{src}: no such file or directory")
    if dst.exists() and dst.resolve() == src.resolve():
        raise BatchError(f"{dst}: refusing to overwrite the input; choose another --output")
    parquet = _is_parquet(src) or dst.suffix == ".parquet"
    if not parquet and src.suffix != ".npz":
        raise BatchError(f"{src}: give samples as .npz, or Parquet (a .parquet file or a directory of them)")
    t0 = time.perf_counter()
    if ray_address is None and actors is None and not parquet:
        import kiln.runtime

        model = kiln.runtime.load(artifact, threads=threads, trusted_keys=trusted_keys)
        outs = run_samples(model, read_samples(src), batch_size)
        write_npz(dst, outs)
        shapes = {k: tuple(v.shape) for k, v in outs.items()}
        count, used = len(next(iter(outs.values()))) if outs else 0, 0
    else:
        from kiln.ray import run_on_ray

        shapes, count = run_on_ray(artifact, src, dst, address=ray_address, actors=actors or 1, batch_size=batch_size,
                                 threads=threads, trusted_keys=trusted_keys)
        used = actors or 1
    return BatchReport(dst, count, time.perf_counter() - t0, used, shapes)


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``kiln batch``'s flags (all but ``--threads`` and ``--debug``, which the CLI shares) to ``p``."""
    p.add_argument("artifact", help="a .kiln file (it contains native code: only run trusted artifacts)")
    p.add_argument("--input", required=True, metavar="DATA",
                   help="samples: an .npz keyed by input name (leading sample axis), or Parquet (file or directory)")
    p.add_argument("--output", required=True, metavar="OUT", help="where to write the outputs: .npz, or Parquet")
    p.add_argument("--ray", metavar="ADDRESS", dest="ray_address",
                   help="run on this Ray cluster (auto, ray://HOST:10001); with --actors alone, a local Ray")
    p.add_argument("--actors", type=int, help="Ray actors, each loading the artifact once (default 1 with --ray)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"samples per model run for a model with a batch dim (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="run only an artifact signed by this public key (file or folder; repeatable; "
                        "default: $KILN_TRUSTED_KEYS)")


def batch_from_args(args: argparse.Namespace) -> BatchReport:
    """Run the job that parsed ``kiln batch`` flags describe."""
    return run_batch(args.artifact, args.input, args.output, ray_address=args.ray_address, actors=args.actors,
                     batch_size=args.batch_size, threads=getattr(args, "threads", None), trusted_keys=args.trust)


def format_report(report: BatchReport) -> str:
    """One line: what was written, how many samples, how fast."""
    where = "this process" if report.actors == 0 else f"{report.actors} Ray actor(s)"
    shapes = ", ".join(f"{k}{list(v)}" for k, v in report.outputs.items())
    return (f"wrote {report.output}: {shapes}; {report.samples} samples in {report.seconds:.2f} s "
            f"({report.samples_per_second:.1f}/s, {where})")


def iter_chunks(columns: Mapping[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    """``columns`` cut into chunks of ``size`` samples."""
    count = len(next(iter(columns.values()))) if columns else 0
    for i in range(0, count, size):
        yield {k: v[i:i + size] for k, v in columns.items()}
