"""Batch inference on Ray Data: a kiln artifact as a ``Dataset.map_batches`` actor.

    import ray, kiln.ray
    ds = ray.data.read_parquet("s3://bucket/images/")          # a column per model input
    out = kiln.ray.map_batches(ds, "model.kiln", actors=4, batch_size=16)
    out.write_parquet("s3://bucket/predictions/")

or, with Ray Data's own call and the callable class:

    ds.map_batches(kiln.ray.KilnPredictor, fn_constructor_args=("model.kiln",), concurrency=4,
                   batch_size=16, batch_format="numpy", num_cpus=1)

Each actor loads the artifact once (verifying it, as :func:`kiln.runtime.load` does) and runs
every batch it gets through it: a model with a batch dim runs each batch as one call, any
other model one sample at a time (see :mod:`kiln.batch` for how samples are laid out).
Columns that are not model inputs pass through. The artifact may be given as bytes, which
Ray ships to the actors, so cluster nodes need no shared file system.

This is the optional ``ray`` extra (``pip install 'kiln-compiler[ray]'``); kiln imports Ray
only here. Deploy-only: it stands on :mod:`kiln.runtime`, never on the compiler.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kiln.batch import ROW_COLUMN, BatchError, iter_chunks, read_samples, run_samples, write_npz
from kiln.errors import KilnError

__all__ = ["KilnPredictor", "map_batches", "run_on_ray"]


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part kiln uses
    except ImportError as e:
        raise KilnError(f"Ray is not installed ({e.name}): pip install 'kiln-compiler[ray]'") from None
    return ray


class KilnPredictor:
    """A callable class for ``Dataset.map_batches(..., batch_format="numpy")``: one artifact per actor."""

    def __init__(self, artifact: str | os.PathLike | bytes, *, threads: int | None = None,
                 trusted_keys: Sequence[str] | None = None) -> None:
        import kiln.runtime

        self._tmp = None
        if isinstance(artifact, bytes):  # shipped by Ray: the actor keeps its own copy
            self._tmp = tempfile.TemporaryDirectory(prefix="kiln-ray-")
            path = Path(self._tmp.name) / "model.kiln"
            path.write_bytes(artifact)
            artifact = path
        self.model = kiln.runtime.load(artifact, threads=threads, trusted_keys=trusted_keys)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs for one batch of samples, with the other columns passed through."""
        size = len(next(iter(batch.values()))) if batch else 0
        return run_samples(self.model, batch, max(1, size))


def _cpus_per_actor(ray: Any, actors: int) -> tuple[int, float]:
    """(threads, CPUs reserved) for each actor: an even share of the cluster's CPUs to run on, no more
    than the largest node has, of which one CPU in all is left unreserved for Ray Data's read and
    write tasks (reserving every CPU for the actors deadlocks a Parquet read on a small cluster)."""
    nodes = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = sum(nodes) or 1
    threads = max(1, int(min(max(nodes, default=1), total // actors)))
    reserved = min(float(threads), max(0.5, (total - 1) / actors))
    return threads, reserved


def map_batches(dataset: Any, artifact: str | os.PathLike | bytes, *, actors: int = 1, batch_size: int = 8,
                threads: int | None = None, num_cpus: float | None = None,
                trusted_keys: Sequence[str] | None = None, **ray_args: Any) -> Any:
    """``dataset`` through ``actors`` :class:`KilnPredictor` actors; a lazy Ray Dataset of the outputs.

    Each actor takes ``num_cpus`` CPUs (default: an even share of the cluster's) and runs the
    model on as many threads (``threads`` overrides that).
    """
    ray = _ray()
    share, reserved = _cpus_per_actor(ray, actors)
    cpus = num_cpus if num_cpus is not None else reserved
    return dataset.map_batches(
        KilnPredictor, fn_constructor_args=(artifact,),
        fn_constructor_kwargs={"threads": threads or (max(1, int(cpus)) if num_cpus is not None else share),
                               "trusted_keys": trusted_keys},
        concurrency=actors, batch_size=batch_size, batch_format="numpy", num_cpus=cpus, **ray_args)


def run_on_ray(artifact: str | os.PathLike, src: Path, dst: Path, *, address: str | None = None, actors: int = 1,
               batch_size: int = 8, threads: int | None = None, trusted_keys: Sequence[str] | None = None
               ) -> tuple[dict[str, tuple[int, ...]], int]:
    """The ``kiln batch --ray`` job: samples from ``src`` (npz or Parquet) to ``dst``; (output shapes, samples).

    Connects to the cluster at ``address``, or starts a local Ray for the job (and stops it
    after). The artifact's bytes travel to the actors through Ray's object store.
    """
    ray = _ray()
    art = Path(artifact)
    if not art.is_file():
        raise BatchError(f"{art}: no such artifact")
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        except ConnectionError as e:
            raise BatchError(f"cannot reach the Ray cluster at {address}: {e}") from None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        if src.suffix == ".npz":
            columns = read_samples(src)
            count = len(next(iter(columns.values()))) if columns else 0
            columns[ROW_COLUMN] = np.arange(count)
            ds = ray.data.from_arrow(_arrow_tables(columns, max(batch_size, -(-count // (4 * actors)))))
        else:
            ds = ray.data.read_parquet(str(src))
        out = map_batches(ds, art.read_bytes(), actors=actors, batch_size=batch_size, threads=threads,
                          trusted_keys=trusted_keys)
        if dst.suffix == ".npz":
            parts = list(out.iter_batches(batch_size=None, batch_format="numpy"))
            result = {k: np.concatenate([p[k] for p in parts]) for k in (parts[0] if parts else {})}
            if ROW_COLUMN in result:
                order = np.argsort(result.pop(ROW_COLUMN), kind="stable")
                result = {k: v[order] for k, v in result.items()}
            write_npz(dst, result)
            return {k: tuple(v.shape) for k, v in result.items()}, len(next(iter(result.values()), []))
        if src.suffix == ".npz":  # (asking `out` for its columns would run the model on a first batch)
            out = out.drop_columns([ROW_COLUMN])
        out.write_parquet(str(dst))
        written = ray.data.read_parquet(str(dst))  # (counting `out` would run the model again)
        count = written.count()
        first = written.take_batch(1, batch_format="numpy") if count else {}
        return {k: (count, *np.asarray(v).shape[1:]) for k, v in first.items()}, count
    finally:
        if started:
            ray.shutdown()


def _arrow_tables(columns: dict[str, np.ndarray], rows: int) -> list[Any]:
    """``columns`` as Arrow tables of ``rows`` samples each, tensors in Ray's tensor extension type."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    def column(a: np.ndarray) -> Any:
        return pa.array(a) if a.ndim == 1 else ArrowTensorArray.from_numpy(np.ascontiguousarray(a))

    return [pa.table({k: column(v) for k, v in chunk.items()}) for chunk in iter_chunks(columns, rows)]
