"""``kiln serve``'s options and their command-line flags (no heavy imports: the CLI builds its parser from here)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass(frozen=True)
class ServeOptions:
    """How ``kiln serve`` listens, batches and stops."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # rows joined along the batch dim per model run; 1 turns batching off
    max_delay_ms: float = 5.0  # how long the first request of a batch waits for others
    workers: int = 1  # threads running the model at once
    threads: int | None = None  # TVM threads per model run (default: the artifact's, or all cores)
    max_body_mb: float = 64.0  # larger request bodies are refused with 413
    drain_seconds: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    trust: tuple[str, ...] | None = None  # public keys an artifact must be signed by (None: $KILN_TRUSTED_KEYS)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise KilnError(f"--port {self.port} is not a TCP port (0..65535; 0 picks a free one)")
        if self.max_batch < 1:
            raise KilnError("--max-batch must be at least 1 (1 turns batching off)")
        if self.max_delay_ms < 0:
            raise KilnError("--max-delay-ms cannot be negative")
        if self.workers < 1:
            raise KilnError("--workers must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise KilnError("--threads must be at least 1")
        if self.max_body_mb <= 0:
            raise KilnError("--max-body-mb must be positive")
        if self.drain_seconds < 0:
            raise KilnError("--drain-seconds cannot be negative")

    @property
    def max_body_bytes(self) -> int:
        """The body size limit in bytes."""
        return int(self.max_body_mb * 1024 * 1024)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``kiln serve``'s flags (all but ``--threads`` and ``--debug``, which the CLI shares) to ``p``."""
    d = ServeOptions()
    p.add_argument("artifact", help="a .kiln file (it contains native code: only serve trusted artifacts)")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port}; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"rows joined into one model run along a symbolic batch dim (default {d.max_batch}; "
                        "1: no batching)")
    p.add_argument("--max-delay-ms", type=float, default=d.max_delay_ms,
                   help=f"how long a request waits for others to join its batch (default {d.max_delay_ms:g})")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"worker threads running the model at once (default {d.workers})")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb,
                   help=f"refuse request bodies larger than this with 413 (default {d.max_body_mb:g})")
    p.add_argument("--drain-seconds", type=float, default=d.drain_seconds,
                   help=f"on SIGTERM, time for requests in flight to finish (default {d.drain_seconds:g})")
    p.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="serve only an artifact signed by this public key (file or folder; repeatable; "
                        "default: $KILN_TRUSTED_KEYS)")


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    """The :class:`ServeOptions` that parsed ``kiln serve`` flags describe."""
    return ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                        workers=args.workers, threads=getattr(args, "threads", None), max_body_mb=args.max_body_mb,
                        drain_seconds=args.drain_seconds, trust=tuple(args.trust) if args.trust else None)
