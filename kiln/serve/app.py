"""The HTTP server: a FastAPI app over one model, run by uvicorn.

Endpoints:

- ``POST /v1/run``: inputs in, outputs out (JSON, npz or safetensors; see :mod:`kiln.serve.codec`),
  through the dynamic batcher (:mod:`kiln.serve.batcher`);
- ``GET /v1/model``: the signature, the batching settings and a summary of the manifest;
- ``GET /healthz``: 200 while serving, 503 once draining;
- ``GET /metrics``: Prometheus text (:mod:`kiln.serve.metrics`).

A bad request gets a 4xx whose body is one line of JSON, ``{"error": ..., "expected":
{"inputs": [...]}}``; nothing a client sends stops the server. SIGTERM drains: the server
stops accepting connections, runs what is queued without waiting for batches to fill,
answers every request in flight, and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Protocol, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from kiln.errors import KilnError
from kiln.serve.batcher import Batcher, batch_dim
from kiln.serve.codec import (
    FORMATS, RequestError, check, decode, encode, media_type, response_format, signature_json, signature_text,
)
from kiln.serve.metrics import Metrics
from kiln.serve.options import ServeOptions

log = logging.getLogger("kiln.serve")

OFFLOAD_BYTES = 256 * 1024  # bodies larger than this are decoded and encoded off the event loop
MANIFEST_SUMMARY = ("kiln_version", "tvm_version", "target", "source", "passes", "tuning_db", "quantization",
                    "signature")


class Model(Protocol):
    """What the server needs of a model: ``kiln.runtime.CompiledModel`` is one."""

    inputs: Sequence[Any]
    outputs: Sequence[Any]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _json(status: int, doc: Any) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")), status_code=status, media_type="application/json")


def create_app(model: Model, options: ServeOptions | None = None, *, name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model``; the batcher starts and stops with the app's lifespan."""
    options = options or ServeOptions()
    dim = batch_dim(model.inputs, model.outputs)
    batcher: Batcher | None = None
    state = {"draining": False}
    metrics = Metrics(lambda: batcher.depth if batcher is not None else 0)
    expected = {"inputs": signature_json(model.inputs)}
    manifest = getattr(model, "manifest", None) or {}
    info = {
        "name": name or str(getattr(model, "path", "model")),
        "inputs": signature_json(model.inputs),
        "outputs": signature_json(model.outputs),
        "batching": None,
        "workers": options.workers,
        "manifest": {k: manifest[k] for k in MANIFEST_SUMMARY if k in manifest},
    }

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal batcher
        batcher = Batcher(model.run, batchable=dim is not None, max_batch=options.max_batch,
                          max_delay_s=options.max_delay_ms / 1e3, workers=options.workers,
                          on_run=metrics.observe_run)
        if batcher.max_batch > 1:
            info["batching"] = {"dim": dim, "max_batch": batcher.max_batch, "max_delay_ms": options.max_delay_ms}
        batcher.start()
        yield
        state["draining"] = True
        await batcher.stop()

    def drain() -> None:
        state["draining"] = True
        if batcher is not None:
            batcher.drain()

    app = FastAPI(title="kiln serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.drain = drain  # SIGTERM calls it on the event loop

    def count(endpoint: str, code: int) -> None:
        metrics.requests.labels(endpoint, str(code)).inc()

    @app.post("/v1/run")
    async def run(request: Request) -> Response:
        code = 500
        t0 = time.perf_counter()
        metrics.in_flight.inc()
        try:
            fmt = media_type(request.headers.get("content-type"))
            if fmt not in FORMATS:
                raise RequestError(415, f"unsupported content type '{fmt or '(none)'}'; send one of "
                                        f"{', '.join(FORMATS)}")
            body = await _read_body(request, options.max_body_bytes)
            if len(body) > OFFLOAD_BYTES:
                feeds = await run_in_threadpool(decode, body, fmt, model.inputs)
            else:
                feeds = decode(body, fmt, model.inputs)
            assert batcher is not None
            outputs = await batcher.submit(check(feeds, model.inputs, dim))
            out_fmt = response_format(fmt, request.headers.get("accept"))
            if sum(a.nbytes for a in outputs.values()) > OFFLOAD_BYTES:
                data = await run_in_threadpool(encode, outputs, out_fmt)
            else:
                data = encode(outputs, out_fmt)
            code = 200
            metrics.latency.observe(time.perf_counter() - t0)
            return Response(data, media_type=out_fmt)
        except RequestError as e:
            code = e.status
            return _json(code, {"error": str(e), "expected": expected})
        except KilnError as e:  # the runtime refused the inputs
            code = 400
            return _json(code, {"error": " ".join(str(e).split()), "expected": expected})
        except Exception as e:  # noqa: BLE001 - answer, log, and keep serving
            log.exception("model run failed")
            return _json(500, {"error": f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"})
        finally:
            metrics.in_flight.dec()
            count("/v1/run", code)

    @app.get("/v1/model")
    async def model_info() -> Response:
        count("/v1/model", 200)
        return _json(200, info)

    @app.get("/healthz")
    async def healthz() -> Response:
        code = 503 if state["draining"] else 200
        count("/healthz", code)
        return _json(code, {"status": "draining" if state["draining"] else "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        count("/metrics", 200)
        return Response(metrics.text(), media_type=metrics.content_type)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    too_big = f"the body is larger than the server's limit of {limit} bytes (--max-body-mb)"
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def run_server(model: Model, options: ServeOptions, *, name: str | None = None,
               announce: Any = sys.stdout) -> None:
    """Serve ``model`` until SIGTERM (drain, then return) or SIGINT (KeyboardInterrupt).

    The socket is bound and listening before the server starts, so ``port=0`` works (the line
    announcing the address names the port chosen) and a client that connects at once waits in the
    backlog until the app is up.
    """
    import uvicorn

    app = create_app(model, options, name=name)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM:  # a planned stop: drain, and exit 0 rather than re-raise the signal
                self.should_exit = True
                asyncio.get_event_loop().call_soon_threadsafe(app.state.drain)
                return
            super().handle_exit(sig, frame)

    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
    # each response waits out the client's delayed ACK (about 40 ms on Linux)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
        sock.listen(2048)  # listening before the address is announced: early clients queue, never get refused
    except OSError as e:
        sock.close()
        raise KilnError(f"cannot listen on {options.host}:{options.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=options.drain_seconds)
    dim = batch_dim(model.inputs, model.outputs)
    batching = (f"batching up to {options.max_batch} rows along {dim} within {options.max_delay_ms:g} ms"
                if dim is not None and options.max_batch > 1 else "no batching" +
                ("" if dim is not None else " (the artifact has no symbolic batch dim)"))
    url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    print(f"kiln: serving {name or getattr(model, 'path', 'model')} ({signature_text(model.inputs)}) on {url}; "
          f"{batching}; {options.workers} worker(s)", file=announce, flush=True)
    Server(config).run(sockets=[sock])
    print("kiln: drained and stopped", file=announce, flush=True)
