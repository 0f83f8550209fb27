"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kiln.serve.batcher import BatchRun

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request count, latency, batch sizes, model run time, queue depth and requests in flight."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter("kiln_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.latency = Histogram("kiln_request_latency_seconds", "Time to answer a /v1/run request (200s only), from the start of its handler",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("kiln_batch_size", "Rows (along the batch dim) per model run",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("kiln_batch_requests", "Requests joined into one model run",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.run_seconds = Histogram("kiln_model_run_seconds", "Time of one model run (one batch)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("kiln_requests_in_flight", "/v1/run requests being answered", registry=r)
        depth = Gauge("kiln_queue_depth", "Requests queued for a batch, not yet running", registry=r)
        depth.set_function(queue_depth)

    def observe_run(self, run: BatchRun) -> None:
        """Record one model run (called from the worker thread; prometheus_client is thread-safe)."""
        self.batch_size.observe(run.rows)
        self.batch_requests.observe(run.requests)
        self.run_seconds.observe(run.seconds)

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
