"""``kiln serve``: real HTTP clients against a real server on 127.0.0.1 (outputs checked against onnxruntime)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx (the serve extra's test client) is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import kiln  # noqa: E402
import kiln.runtime  # noqa: E402
from kiln.ir.oracle import compare  # noqa: E402
from kiln.serve.batcher import Batcher, batch_dim  # noqa: E402
from kiln.serve.codec import check  # noqa: E402
from helpers import f32, make_model, ort_outputs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
SIGNATURE = [{"name": "input", "dtype": "float32", "shape": ["N", 3, 64, 64]}]


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 64, 64)).astype(np.float32)


def _matches_onnxruntime(outputs: dict, x: np.ndarray) -> None:
    got = {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}
    cmp = compare("served vs onnxruntime", got, ort_outputs(str(EXAMPLE), {"input": x}), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """The bundled example, compiled with its symbolic batch dim N."""
    path = tmp_path_factory.mktemp("serve") / "tiny.kiln"
    kiln.compile(EXAMPLE, path)
    return path


@contextmanager
def serving(artifact: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen, list[str]]]:
    """``kiln serve ARTIFACT --port 0 FLAGS`` in its own process; (base URL, process, stdout lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--port", "0", *flags],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("kiln: serving"):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(180) and proc.poll() is None, "\n".join(lines)
        url = next(l for l in lines if l.startswith("kiln: serving")).split(" on ")[1].split(";")[0]
        assert url.startswith("http://127.0.0.1:")
        yield url, proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(artifact) -> Iterator[str]:
    with serving(artifact, "--max-batch", "8", "--max-delay-ms", "100", "--max-body-mb", "1") as (url, _, _):
        yield url


def _metrics(url: str) -> dict[str, dict[tuple, float]]:
    """The server's /metrics as {sample name: {sorted labels: value}}."""
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_model_and_health(server):
    info = httpx.get(f"{server}/v1/model").json()
    assert info["inputs"] == SIGNATURE
    assert info["outputs"] == [{"name": "probs", "dtype": "float32", "shape": ["N", 10]}]
    assert info["batching"] == {"dim": "N", "max_batch": 8, "max_delay_ms": 100.0}
    assert info["manifest"]["source"]["name"] == "tiny_cnn.onnx" and "target" in info["manifest"]
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}


def test_json_npz_and_safetensors_bodies(server):
    from safetensors.numpy import load, save

    x = _x(2, 1)
    r = httpx.post(f"{server}/v1/run", json={"inputs": {"input": x.tolist()}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    _matches_onnxruntime(r.json()["outputs"], x)

    r = httpx.post(f"{server}/v1/run", content=_npz(input=x), headers={"content-type": "application/x-npz"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(r.content)) as out:
        _matches_onnxruntime({k: out[k] for k in out.files}, x)

    r = httpx.post(f"{server}/v1/run", content=save({"input": x}),
                   headers={"content-type": "application/x-safetensors", "accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    _matches_onnxruntime(r.json()["outputs"], x)
    r = httpx.post(f"{server}/v1/run", content=_npz(input=x),
                   headers={"content-type": "application/x-npz", "accept": "application/x-safetensors"})
    _matches_onnxruntime(load(r.content), x)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server):
    before = _metrics(server)
    xs = [_x(1 + i % 3, 100 + i) for i in range(12)]  # 1 to 3 rows each: 24 rows

    def post(x: np.ndarray) -> httpx.Response:
        return httpx.post(f"{server}/v1/run", content=_npz(input=x), headers={"content-type": "application/x-npz"},
                          timeout=60)

    with ThreadPoolExecutor(len(xs)) as pool:
        responses = list(pool.map(post, xs))
    for x, r in zip(xs, responses):
        assert r.status_code == 200, r.text
        with np.load(io.BytesIO(r.content)) as out:
            assert out["probs"].shape == (len(x), 10)
            _matches_onnxruntime({"probs": out["probs"]}, x)
    after = _metrics(server)

    def delta(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return after[name].get(key, 0.0) - before.get(name, {}).get(key, 0.0)

    runs = delta("kiln_batch_size_count")
    assert delta("kiln_batch_size_sum") == 24 and delta("kiln_batch_requests_sum") == 12
    assert 0 < runs < 12  # requests were joined: fewer model runs than requests
    assert delta("kiln_batch_size_bucket", le="8.0") == runs  # and no run took more than --max-batch rows
    assert delta("kiln_requests_total", endpoint="/v1/run", code="200") == 12
    assert delta("kiln_request_latency_seconds_count") == 12
    assert after["kiln_queue_depth"][()] == 0 and after["kiln_requests_in_flight"][()] == 0


def _bad_requests() -> list[tuple[str, int, dict, str]]:
    x = _x(1, 3)
    return [
        ("malformed JSON", 400, {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}},
         "malformed JSON"),
        ("no inputs key", 400, {"json": {"input": x.tolist()}}, '{"inputs"'),
        ("wrong name", 400, {"json": {"inputs": {"image": x.tolist()}}}, "missing input; unexpected image"),
        ("wrong shape", 400, {"json": {"inputs": {"input": x[:, :2].tolist()}}}, "has shape [1, 2, 64, 64]"),
        ("ragged list", 400, {"json": {"inputs": {"input": [[1.0, 2.0], [3.0]]}}}, "ragged"),
        ("bools for floats", 400, {"json": {"inputs": {"input": np.zeros((1, 3, 64, 64), bool).tolist()}}},
         "true/false"),
        ("wrong dtype", 400, {"content": _npz(input=x.astype(np.float64)),
                              "headers": {"content-type": "application/x-npz"}}, "has dtype float64"),
        ("not an npz", 400, {"content": b"PK\x03\x04 not really", "headers": {"content-type": "application/x-npz"}},
         "not a readable .npz"),
        ("too large", 413, {"content": _npz(input=_x(32, 4)), "headers": {"content-type": "application/x-npz"}},
         "larger than the server's limit"),
        ("content type", 415, {"content": b"1,2,3", "headers": {"content-type": "text/csv"}},
         "unsupported content type 'text/csv'"),
    ]


@pytest.mark.parametrize("case, status, request_args, message", _bad_requests(), ids=[c[0] for c in _bad_requests()])
def test_a_bad_request_gets_a_4xx_naming_the_signature_and_the_server_keeps_serving(
        server, case, status, request_args, message):
    r = httpx.post(f"{server}/v1/run", **request_args)
    assert r.status_code == status, r.text
    assert "\n" not in r.text.strip()  # one line
    body = r.json()
    assert message in body["error"] and body["expected"] == {"inputs": SIGNATURE}
    x = _x(1, 5)
    ok = httpx.post(f"{server}/v1/run", json={"inputs": {"input": x.tolist()}})
    assert ok.status_code == 200
    _matches_onnxruntime(ok.json()["outputs"], x)


def test_a_static_batch_artifact_runs_requests_one_by_one(tmp_path):
    static = tmp_path / "static.kiln"
    kiln.compile(EXAMPLE, static, input_shapes={"input": (1, 3, 64, 64)})
    with serving(static, "--max-batch", "8", "--max-delay-ms", "100") as (url, _, lines):
        assert "no batching" in lines[-1]
        assert httpx.get(f"{url}/v1/model").json()["batching"] is None
        xs = [_x(1, 200 + i) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda x: httpx.post(f"{url}/v1/run", json={"inputs": {"input": x.tolist()}},
                                                           timeout=60), xs))
        for x, r in zip(xs, responses):
            assert r.status_code == 200, r.text
            _matches_onnxruntime(r.json()["outputs"], x)
        m = _metrics(url)
        assert m["kiln_batch_requests_count"][()] == 6 and m["kiln_batch_requests_sum"][()] == 6
        two = httpx.post(f"{url}/v1/run", json={"inputs": {"input": _x(2, 0).tolist()}})
        assert two.status_code == 400 and "has shape [2, 3, 64, 64]" in two.json()["error"]


def test_sigterm_drains_the_requests_in_flight_and_exits_0(artifact):
    # a long --max-delay-ms keeps the requests queued until SIGTERM comes
    with serving(artifact, "--max-batch", "64", "--max-delay-ms", "60000") as (url, proc, lines):
        xs = [_x(1, 300 + i) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/run", json={"inputs": {"input": x.tolist()}}, timeout=120)
                       for x in xs]
            deadline = time.monotonic() + 60
            while _metrics(url)["kiln_queue_depth"][()] < 4:
                assert time.monotonic() < deadline and not any(f.done() for f in futures)
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        for x, r in zip(xs, responses):
            assert r.status_code == 200, r.text
            _matches_onnxruntime(r.json()["outputs"], x)
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):  # and it no longer accepts connections
            httpx.get(f"{url}/healthz")
    assert "kiln: drained and stopped" in lines


def test_a_request_in_flight_holds_the_drain_open_while_new_connections_are_refused(artifact):
    import socket
    from urllib.parse import urlsplit

    with serving(artifact) as (url, proc, _):
        host, port = urlsplit(url).hostname, urlsplit(url).port
        x = _x(1, 9)
        body = json.dumps({"inputs": {"input": x.tolist()}}).encode()
        conn = socket.create_connection((host, port), timeout=60)
        try:  # a client still sending its body: the request is in flight
            conn.sendall(b"POST /v1/run HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:1000])
            deadline = time.monotonic() + 60
            while _metrics(url)["kiln_requests_in_flight"][()] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            refused = False
            while not refused and time.monotonic() < deadline:
                try:
                    httpx.get(f"{url}/healthz", timeout=5)
                    time.sleep(0.05)
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    refused = True  # refused, or reset: a connection the closing listener took but will not serve
            assert refused and proc.poll() is None  # not accepting, and still draining
            conn.sendall(body[1000:])
            reply = b""
            while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _content_length(reply):
                chunk = conn.recv(65536)
                assert chunk, reply[:300]
                reply += chunk
        finally:
            conn.close()
        head, payload = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200")
        _matches_onnxruntime(json.loads(payload)["outputs"], x)
        assert proc.wait(60) == 0


def _content_length(reply: bytes) -> int:
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 1 << 30


def test_the_model_runs_off_the_event_loop_and_batches_group_by_non_batch_dims(tmp_path):
    """With the model held inside a run, the event loop keeps going; requests of other shapes wait for their own batch."""
    from onnx import helper

    onnx_path = tmp_path / "affine.onnx"
    model = make_model([helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Add", ["sq", "x"], ["y"])],
                       [f32("x", ["N", "S"])], [f32("y", ["N", "S"])])
    onnx_path.write_bytes(model.SerializeToString())
    kiln.compile(onnx_path, tmp_path / "affine.kiln")
    compiled = kiln.runtime.load(tmp_path / "affine.kiln")
    dim = batch_dim(compiled.inputs, compiled.outputs)
    assert dim == "N"
    gate, calls = threading.Event(), []

    def run_model(feeds):
        calls.append({k: v.shape for k, v in feeds.items()})
        assert gate.wait(30)
        return compiled.run(feeds)

    async def scenario():
        runs = []
        b = Batcher(run_model, batchable=True, max_batch=8, max_delay_s=0.05, workers=1, on_run=runs.append)
        b.start()
        xs = [np.random.default_rng(i).standard_normal((1 + i % 2, 4 if i < 4 else 6)).astype(np.float32)
              for i in range(6)]
        tasks = [asyncio.create_task(b.submit(check({"x": x}, compiled.inputs, dim))) for x in xs]
        ticks = 0
        while len(calls) < 1:  # the first batch is inside the model, which is held
            await asyncio.sleep(0.01)
            ticks += 1
        for _ in range(20):  # the event loop is not blocked by the held model run
            await asyncio.sleep(0.005)
            ticks += 1
        gate.set()
        outs = await asyncio.gather(*tasks)
        await b.stop()
        return xs, outs, runs, ticks

    xs, outs, runs, ticks = asyncio.run(scenario())
    assert ticks >= 20
    assert sorted((c["x"][1], c["x"][0]) for c in calls) == [(4, 6), (6, 3)]  # S=4: 6 rows; S=6: 3 rows
    assert [r.requests for r in runs] == [4, 2]
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out["y"], x * x + x, rtol=1e-6)


def test_serve_refuses_bad_flags_and_missing_artifacts_in_one_line(tmp_path, artifact):
    for args, message in [([str(tmp_path / "missing.kiln")], "no such artifact"),
                          ([str(artifact), "--max-batch", "0"], "--max-batch must be at least 1")]:
        proc = subprocess.run([sys.executable, "-m", "kiln.cli", "serve", *args, "--port", "0"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_connections_are_tcp_with_nodelay_so_responses_are_not_held_for_a_delayed_ack(artifact, monkeypatch):
    """The socket kiln serve binds says it is TCP: asyncio then sets TCP_NODELAY on every connection it
    accepts (it does so only where the socket's proto is IPPROTO_TCP); without it, each response waits
    out the client's delayed ACK, some 40 ms a request on Linux."""
    import socket

    import uvicorn

    from kiln.serve import ServeOptions
    from kiln.serve.app import run_server

    bound: list[socket.socket] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: bound.extend(sockets))
    run_server(kiln.runtime.load(artifact), ServeOptions(port=0), announce=io.StringIO())
    (sock,) = bound

    async def accepted_nodelay() -> int:
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                got.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        client = socket.create_connection(sock.getsockname()[:2], timeout=10)
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert asyncio.run(accepted_nodelay()) != 0
    finally:
        sock.close()
