"""Load-test ``kiln serve``: throughput and latency with dynamic batching on and off, against onnxruntime.

    .venv/bin/python bench/serve_load.py [--models resnet50,bert] [--clients 1,8,32] [--rounds 3]
        [--requests 800] [--seconds 4] [--out bench/SERVE_RESULTS.md] [--json OUT.json] [--ray]
    .venv/bin/python bench/serve_load.py --onnx MODEL.onnx [--input-shape NAME=Nx3x64x64] ...

Models: ``resnet50`` is onnx's light ResNet-50 (random weights) at ``--resnet-size`` (default
112, a quarter of 224's work, so that two cores answer enough requests per measurement; its head
is rewritten to a global average pool so any size works), compiled with a free batch dim ``N``;
``bert`` is the tests' tiny BERT (``tests/tools/export_tiny_transformers.py``: 2 layers, hidden 32,
16 tokens per request), exported here with a batch dim ``N`` (it needs torch and transformers,
the ``transformers-tests`` extra). ``--onnx`` takes any model with a symbolic leading dim instead.
Sources are cached under ``~/.cache/kiln/models``, artifacts under ``~/.cache/kiln/serve-load``
(``--cache``; ``--recompile`` rebuilds them).

Each configuration runs in its own server process on 127.0.0.1 (a free port): ``kiln serve``
with batching (``--max-batch 8 --max-delay-ms 5``), ``kiln serve --max-batch 1``, and
onnxruntime behind the same server app (:class:`OrtModel`, one request at a time). Closed-loop
clients (threads, an httpx connection each) send npz requests of one row; each measurement
stops after ``--requests`` requests or ``--seconds`` seconds, whichever comes first. Rounds
alternate the configurations; the figures are medians over rounds. Model run times and batch
sizes come from each server's ``/metrics``.

``--ray`` also times ``kiln batch``'s Ray path (:func:`kiln.ray.run_on_ray`) with 1 and 2 actors
on a local Ray (``ray.init(num_cpus=<cores>)``): the whole job, and the actors' batches alone.

The tool runs itself as the onnxruntime server: ``serve_load.py serve-onnx MODEL.onnx [kiln serve flags]``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KILN_MODEL_CACHE", Path.home() / ".cache" / "kiln" / "models"))
NPZ = "application/x-npz"
ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}


# -- onnxruntime behind kiln's server -------------------------------------------------------

@dataclass(frozen=True)
class Sig:
    """An input or output as :mod:`kiln.serve` reads it: name, numpy dtype name, dims (ints or names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


class OrtModel:
    """An onnxruntime ``InferenceSession`` with the server's Model protocol (``inputs``, ``outputs``, ``run``)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as kiln bench runs it
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [self._sig(a) for a in self.session.get_inputs()]
        self.outputs = [self._sig(a) for a in self.session.get_outputs()]
        self.manifest = {"source": {"name": Path(self.path).name}, "target": f"onnxruntime {ort.__version__} (CPU)"}

    @staticmethod
    def _sig(arg: Any) -> Sig:
        """An onnxruntime ``NodeArg`` as a :class:`Sig` (an unnamed dynamic dim gets a name of its own)."""
        dims = tuple(d if isinstance(d, (int, str)) else f"{arg.name}_d{i}" for i, d in enumerate(arg.shape))
        return Sig(arg.name, ORT_DTYPES.get(arg.type, arg.type), dims)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference: outputs by name."""
        names = [o.name for o in self.outputs]
        return dict(zip(names, self.session.run(names, inputs)))


def serve_onnx(argv: Sequence[str]) -> int:
    """``serve_load.py serve-onnx MODEL.onnx [kiln serve flags] [--threads N]``: onnxruntime behind kiln's server."""
    from kiln.serve import add_serve_arguments, options_from_args
    from kiln.serve.app import run_server

    p = argparse.ArgumentParser(prog="serve_load.py serve-onnx")
    add_serve_arguments(p)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    args = p.parse_args(argv)
    model = OrtModel(args.artifact, threads=args.threads)
    run_server(model, options_from_args(args), name=f"{Path(args.artifact).name} (onnxruntime)")
    return 0


# -- models ----------------------------------------------------------------------------------

@dataclass
class Case:
    """A model under load: its source ONNX, the shapes it is compiled with, and a request's inputs."""

    key: str
    label: str
    source: Path  # what kiln compiles
    shapes: dict[str, tuple] | None  # --input-shape pins ("N" frees the batch dim); None: the model's own
    feeds: Callable[[int], dict[str, np.ndarray]]  # seed -> one request's inputs (one row)
    ort_source: Path | None = None  # what onnxruntime serves (default: the source)
    artifact: Path | None = None


def _resnet50(size: int = 112) -> Case:
    """onnx's light ResNet-50 (random weights, from the tests' model cache) at ``size`` x ``size``."""
    path = resnet50_at(size)
    return Case("resnet50", f"light ResNet-50 (random weights, 3x{size}x{size})", path,
                {"gpu_0/data_0": ("N", 3, size, size)},
                lambda seed: {"gpu_0/data_0": np.random.default_rng(seed).standard_normal((1, 3, size, size))
                              .astype(np.float32)})


def resnet50_at(size: int) -> Path:
    """The light ResNet-50 made resolution-free and batchable, cached beside the tests' copy.

    Its head is a 7x7 AveragePool and a Reshape to [1, 2048], which fix the input at 1x3x224x224;
    a GlobalAveragePool and a Reshape to [0, 2048] (0 keeps the batch dim) compute the same at 224
    and take any size and batch. The input is declared [N, 3, size, size].
    """
    import onnx
    from onnx import helper, numpy_helper

    sys.path.insert(0, str(ROOT / "tests"))
    from models import CACHE as TESTS_CACHE, model_path

    target = TESTS_CACHE / "light" / f"light_resnet50_batch_{size}.onnx"
    if target.exists():
        return target
    model = onnx.load(str(model_path("light_resnet50")))
    g = model.graph
    for i, node in enumerate(g.node):
        if node.op_type == "AveragePool" and [a.ints for a in node.attribute if a.name == "kernel_shape"] == [[7, 7]]:
            g.node[i].CopyFrom(helper.make_node("GlobalAveragePool", list(node.input), list(node.output), node.name))
        if node.op_type == "Reshape":
            for t in g.initializer:
                if t.name == node.input[1] and list(numpy_helper.to_array(t)) == [1, 2048]:
                    t.CopyFrom(numpy_helper.from_array(np.array([0, 2048], np.int64), t.name))  # 0: keep N
    dims = g.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_param = "N"
    dims[2].dim_value = dims[3].dim_value = size
    out = g.output[0].type.tensor_type.shape.dim[0]
    out.Clear()
    out.dim_param = "N"
    del g.value_info[:]
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    onnx.save(model, str(tmp))
    tmp.replace(target)
    return target


def _bert_feeds(seed: int) -> dict[str, np.ndarray]:
    """One BERT request: 16 token ids, of which the first 8 to 16 are unmasked."""
    rng = np.random.default_rng(seed)
    length = int(rng.integers(8, 17))  # padded to 16 tokens; the rest masked
    return {"input_ids": rng.integers(0, 128, (1, 16)).astype(np.int64),
            "attention_mask": (np.arange(16) < length).astype(np.int64)[None]}


def _bert() -> Case:
    """The tests' tiny BERT, exported with a batch dim N next to the tests' own export (cached)."""
    try:  # (the versions, as the tests key their export; torch itself loads only in the exporting process)
        versions = f"torch-{metadata.version('torch')}-transformers-{metadata.version('transformers')}"
    except metadata.PackageNotFoundError as e:
        raise SystemExit(f"the bert model needs torch and transformers (the transformers-tests extra): {e}")
    out = CACHE / "tiny-transformers" / versions
    path = out / "bert_batch.onnx"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import serve_load; " \
               f"serve_load.export_bert({str(path)!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not path.exists():
            raise SystemExit(f"exporting the tiny BERT failed:\n{proc.stderr[-2000:]}")
    return Case("bert", "tiny BERT (2 layers, hidden 32, 16 tokens)", path, None, _bert_feeds)


def export_bert(path: str) -> None:
    """Export the tests' tiny BERT (same config and seed) with a symbolic batch dim ``N``.

    The attention mask goes in as the additive [N,1,1,16] mask BERT builds from it. The tool
    began so because transformers' own mask builder (``arange(N)``) did not compile along a
    symbolic dim; it does now, and the tool keeps the broadened mask so its figures stay comparable.
    """
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "tools"))
    from export_tiny_transformers import TinyBert

    class BatchBert(TinyBert):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            extended = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            return self.m(input_ids=input_ids, attention_mask=extended, return_dict=True).last_hidden_state

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    batch = torch.export.Dim("N", min=1, max=4096)
    tmp = Path(path).with_suffix(".part.onnx")
    torch.onnx.export(BatchBert().eval(), (ids, mask), str(tmp), input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], opset_version=18, dynamo=True, dynamic_shapes=({0: batch}, {0: batch}),
                      external_data=False)
    tmp.replace(path)


def _onnx_case(path: Path, shapes: dict[str, tuple] | None) -> Case:
    """Any ONNX model with a symbolic leading dim; requests are one row of seeded values."""
    case = Case(path.stem, path.name, path, shapes, lambda seed: {})
    signature: list[Any] = []

    def feeds(seed: int) -> dict[str, np.ndarray]:
        import kiln.runtime

        if not signature:
            assert case.artifact is not None, "compile the case first"
            signature.extend(kiln.runtime.load(case.artifact).inputs)
        rng = np.random.default_rng(seed)
        out = {}
        for s in signature:
            shape = tuple(1 if isinstance(d, str) else d for d in s.shape)
            dt = np.dtype(s.dtype)
            out[s.name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f" else
                           rng.integers(0, 2, shape).astype(dt))
        return out

    case.feeds = feeds
    return case


def _parse_shape(spec: str) -> tuple[str, tuple]:
    """``NAME=Nx3x64x64`` as (name, dims), names kept for symbolic dims."""
    name, _, dims = spec.rpartition("=")
    return name, tuple(int(d) if d.isdigit() else d for d in dims.split("x"))


def compile_case(case: Case, cache: Path, recompile: bool = False) -> Path:
    """The case's artifact, compiled once into ``cache`` (keyed by the source, the shapes and the versions)."""
    import kiln

    key = hashlib.sha256()
    key.update(case.source.read_bytes())
    key.update(json.dumps(case.shapes, sort_keys=True).encode())
    key.update(f"{kiln.__version__} {metadata.version('apache-tvm')} {platform.machine()}".encode())
    path = cache / f"{case.key}-{key.hexdigest()[:16]}.kiln"
    if recompile or not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp = path.with_suffix(".part.kiln")
        kiln.compile(case.source, tmp, input_shapes=case.shapes)
        tmp.replace(path)
        print(f"[serve-load] compiled {case.key} in {time.perf_counter() - t0:.1f} s: {path.name}", flush=True)
    case.artifact = path
    return path


# -- servers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One server configuration: engine and batching."""

    engine: str  # "kiln" or "onnxruntime"
    max_batch: int
    max_delay_ms: float

    @property
    def batching(self) -> str:
        """How the table names the batching."""
        return f"on (max {self.max_batch}, {self.max_delay_ms:g} ms)" if self.max_batch > 1 else "off"


class ServerProcess:
    """A server for one case and configuration in its own process, on 127.0.0.1 and a free port."""

    def __init__(self, case: Case, config: Config, threads: int) -> None:
        assert case.artifact is not None
        flags = ["--host", "127.0.0.1", "--port", "0", "--max-batch", str(config.max_batch),
                 "--max-delay-ms", str(config.max_delay_ms), "--threads", str(threads)]
        if config.engine == "kiln":
            self.cmd = [sys.executable, "-m", "kiln.cli", "serve", str(case.artifact), *flags]
        else:
            self.cmd = [sys.executable, str(Path(__file__).resolve()), "serve-onnx",
                        str(case.ort_source or case.source), *flags]
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """Collect the server's output lines (in a thread) and flag the line announcing its address."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("kiln: serving"):
                self._ready.set()
        self._ready.set()

    def url(self, timeout: float = 300) -> str:
        """The base URL, once the server has announced it (which it does once it listens)."""
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"{' '.join(self.cmd)} did not start:\n" + "\n".join(self.lines[-30:]))
        return next(l for l in self.lines if l.startswith("kiln: serving")).split(" on ")[1].split(";")[0]

    def stop(self) -> None:
        """SIGTERM (the server drains and exits 0); killed if it has not stopped within a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def _servers(case: Case, configs: list[Config], threads: int) -> Iterator[dict[Config, str]]:
    """One server per configuration, started together and all up at once (idle ones cost nothing)."""
    procs: list[ServerProcess] = []
    try:
        for c in configs:
            procs.append(ServerProcess(case, c, threads))
        yield {c: p.url() for c, p in zip(configs, procs)}
    finally:
        for p in procs:
            p.stop()


def _metrics(http: Any, url: str) -> dict[str, float]:
    """The model-run sums from a server's /metrics: runs, run seconds, rows and requests batched."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"kiln_model_run_seconds_count": "runs", "kiln_model_run_seconds_sum": "run_s",
              "kiln_batch_size_sum": "rows", "kiln_batch_requests_sum": "requests"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(http.get(f"{url}/metrics", headers={"accept": "*/*"}).text):
        for s in family.samples:
            if s.name in wanted:
                out[wanted[s.name]] = s.value
    return out


# -- load ------------------------------------------------------------------------------------

@dataclass
class Round:
    """One bounded measurement of one configuration at one client count."""

    sent: int
    ok: int
    errors: dict[str, int]
    seconds: float
    throughput: float  # 200s per second
    p50_ms: float
    p99_ms: float
    runs: int  # model runs (batches), from /metrics
    rows_per_run: float
    run_ms: float  # mean time of one model run
    client_cpu_ms: float  # the load generator's own CPU time per request (user and system)


class Clients:
    """Keep-alive httpx clients for one server, one per concurrent client, made before any timing starts
    (making an httpx client loads a TLS context: tens of ms of CPU that must not land in a measurement)."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url, self.timeout = url, timeout
        self.clients: list[Any] = []

    def get(self, n: int) -> list[Any]:
        """The first ``n`` clients, making the missing ones."""
        import httpx

        while len(self.clients) < n:
            self.clients.append(httpx.Client(base_url=self.url, timeout=self.timeout,
                                             headers={"content-type": NPZ, "accept": NPZ}))
        return self.clients[:n]

    def close(self) -> None:
        """Close every connection."""
        for c in self.clients:
            c.close()


def _drive(clients: list[Any], bodies: list[bytes], max_requests: int,
           max_seconds: float) -> tuple[int, list[float], Counter, float]:
    """One closed-loop thread per client until ``max_requests`` are sent or ``max_seconds`` pass;
    (requests sent, latencies of the 200s in s, other outcomes, seconds to the last answer)."""
    import httpx

    latencies: list[float] = []
    errors: Counter = Counter()
    lock = threading.Lock()
    state = {"sent": 0}
    go = threading.Barrier(len(clients) + 1)

    def client(http: Any) -> None:
        go.wait()
        while True:
            with lock:
                if state["sent"] >= max_requests or time.perf_counter() >= deadline:
                    return
                body = bodies[state["sent"] % len(bodies)]
                state["sent"] += 1
            t0 = time.perf_counter()
            try:
                r = http.post("/v1/run", content=body)
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            took = time.perf_counter() - t0
            with lock:
                if status == "200":
                    latencies.append(took)
                else:
                    errors[status] += 1

    threads = [threading.Thread(target=client, args=(c,), name=f"client-{i}") for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    deadline = start + max_seconds
    go.wait()
    for t in threads:
        t.join()
    return state["sent"], latencies, errors, time.perf_counter() - start


def measure(pool: Clients, bodies: list[bytes], clients: int, max_requests: int, max_seconds: float) -> Round:
    """One bounded load round against a running server, with its model-run figures from /metrics."""
    http = pool.get(max(clients, 1))
    before = _metrics(http[0], pool.url)
    cpu = time.process_time()
    sent, lat, errors, elapsed = _drive(http[:clients], bodies, max_requests, max_seconds)
    cpu = time.process_time() - cpu
    after = _metrics(http[0], pool.url)
    d = {k: after[k] - before[k] for k in after}
    ms = np.asarray(lat) * 1e3
    return Round(sent=sent, ok=len(lat), errors=dict(errors), seconds=elapsed,
                 throughput=len(lat) / elapsed if elapsed > 0 else 0.0,
                 p50_ms=float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                 p99_ms=float(np.percentile(ms, 99)) if len(ms) else float("nan"),
                 runs=int(d["runs"]), rows_per_run=d["rows"] / d["runs"] if d["runs"] else 0.0,
                 run_ms=1e3 * d["run_s"] / d["runs"] if d["runs"] else 0.0,
                 client_cpu_ms=1e3 * cpu / sent if sent else 0.0)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """A request body: ``arrays`` as an npz archive."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclass
class Cell:
    """A (model, engine, batching, clients) row: its rounds and their medians."""

    model: str
    engine: str
    batching: str
    max_batch: int
    clients: int
    rounds: list[Round] = field(default_factory=list)

    def median(self, attr: str) -> float:
        """The median of one figure over the rounds."""
        return float(statistics.median(getattr(r, attr) for r in self.rounds))

    def summary(self) -> dict[str, Any]:
        """The cell as JSON: medians, and every round."""
        return {"model": self.model, "engine": self.engine, "batching": self.batching, "max_batch": self.max_batch,
                "clients": self.clients, "throughput": self.median("throughput"), "p50_ms": self.median("p50_ms"),
                "p99_ms": self.median("p99_ms"), "rows_per_run": self.median("rows_per_run"),
                "run_ms": self.median("run_ms"), "client_cpu_ms": self.median("client_cpu_ms"),
                "sent": sum(r.sent for r in self.rounds), "ok": sum(r.ok for r in self.rounds),
                "errors": dict(sum((Counter(r.errors) for r in self.rounds), Counter())),
                "rounds": [asdict(r) for r in self.rounds]}


def load_test(cases: list[Case], configs: list[Config], clients: list[int], rounds: int, max_requests: int,
              max_seconds: float, threads: int, warmup: bool = True,
              agreement: dict[str, float] | None = None) -> list[Cell]:
    """Every case under every configuration and client count; rounds alternate the configurations.

    ``agreement`` gets, per model, the largest difference between the servers' outputs for one request.
    """
    cells: list[Cell] = []
    agreement = {} if agreement is None else agreement
    for case in cases:
        bodies = [_npz(case.feeds(seed)) for seed in range(16)]
        mine = {(c, n): Cell(case.key, c.engine, c.batching, c.max_batch, n) for c in configs for n in clients}
        cells.extend(mine.values())
        with _servers(case, configs, threads) as urls:
            for c in configs:
                if c.max_batch > 1 and _info(urls[c])["batching"] is None:
                    raise SystemExit(f"{case.key}: the server does not batch: its artifact has no symbolic dim "
                                     "leading every input and output (see docs/serving.md)")
            agreement[case.key] = _agreement(urls, configs, bodies[0])
            pools = {c: Clients(urls[c]) for c in configs}
            try:
                for c in configs:  # connect every client before timing
                    for http in pools[c].get(max(clients)):
                        http.get("/healthz")
                if warmup:
                    for c in configs:  # first runs (and first batches) allocate; keep them out of the figures
                        measure(pools[c], bodies, max(clients), 2 * max(clients), 3.0)
                for r in range(rounds):
                    order = configs[r % len(configs):] + configs[:r % len(configs)]
                    for n in clients:
                        for c in order:
                            result = measure(pools[c], bodies, n, max_requests, max_seconds)
                            mine[(c, n)].rounds.append(result)
                            print(f"[serve-load] {case.key} {c.engine:11s} batching {c.batching:18s} "
                                  f"{n:3d} clients round {r + 1}: {result.throughput:8.1f} req/s  "
                                  f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  "
                                  f"{result.rows_per_run:4.1f} rows/run  {result.run_ms:6.1f} ms/run  "
                                  f"({result.ok}/{result.sent} ok)", flush=True)
                            time.sleep(0.2)
            finally:
                for pool in pools.values():
                    pool.close()
    return cells


def _info(url: str) -> dict[str, Any]:
    """A server's ``GET /v1/model``."""
    import httpx

    r = httpx.get(f"{url}/v1/model", timeout=30)
    r.raise_for_status()
    return r.json()


def _agreement(urls: dict[Config, str], configs: list[Config], body: bytes) -> float:
    """The largest absolute difference between the servers' answers to one request (they run one model)."""
    import httpx

    answers = []
    for c in configs:
        r = httpx.post(f"{urls[c]}/v1/run", content=body, headers={"content-type": NPZ}, timeout=120)
        r.raise_for_status()
        with np.load(io.BytesIO(r.content)) as out:
            answers.append({k: out[k].astype(np.float64) for k in out.files})
    return max((float(np.max(np.abs(a[k] - answers[0][k]))) for a in answers[1:] for k in a), default=0.0)


def check_goals(cells: list[Cell], max_delay_ms: float) -> list[dict[str, Any]]:
    """The two goals per model: batching's throughput gain at the most clients, and p99 within the bound."""
    goals = []
    for model in dict.fromkeys(c.model for c in cells):
        mine = [c for c in cells if c.model == model and c.engine == "kiln"]
        top = max(c.clients for c in mine)
        on = next((c for c in mine if c.max_batch > 1 and c.clients == top), None)
        off = next((c for c in mine if c.max_batch == 1 and c.clients == top), None)
        if on and off:
            gain = on.median("throughput") / off.median("throughput")
            goals.append({"model": model, "goal": f"batching at {top} clients >= 1.5x the throughput of none",
                          "holds": gain >= 1.5, "detail": f"{gain:.2f}x ({on.median('throughput'):.1f} vs "
                                                          f"{off.median('throughput'):.1f} req/s)"})
        # what a request costs besides the model: an unbatched request's p50 with 1 client, less its run
        lone = next((c for c in mine if c.max_batch == 1 and c.clients == 1), None)
        trip = max(0.0, lone.median("p50_ms") - lone.median("run_ms")) if lone else None
        for c in sorted((c for c in mine if c.max_batch > 1), key=lambda c: c.clients):
            bound = max_delay_ms + 2 * c.median("run_ms")
            p99 = c.median("p99_ms")
            goals.append({"model": model,
                          "goal": f"p99 at {c.clients} clients <= max-delay + 2 batch runs",
                          "holds": p99 <= bound,
                          "holds_with_round_trip": None if trip is None else p99 <= bound + trip,
                          "detail": f"p99 {p99:.1f} ms vs {max_delay_ms:g} + 2 x {c.median('run_ms'):.1f} = "
                                    f"{bound:.1f} ms" + ("" if trip is None else
                                    f"; with an unbatched request's {trip:.1f} ms round trip (HTTP, codec, "
                                    f"client; 1 client) added: {bound + trip:.1f} ms, "
                                    f"{'within' if p99 <= bound + trip else 'exceeded'}")})
    return goals


# -- Ray -------------------------------------------------------------------------------------

def _timed_predictor() -> type:
    """:class:`kiln.ray.KilnPredictor` that adds each batch's start and end time as columns (defined here,
    in a function, so that Ray ships the class by value to its workers)."""
    import kiln.ray

    class TimedPredictor(kiln.ray.KilnPredictor):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            t0 = time.time()
            out = super().__call__(batch)
            rows = len(next(iter(out.values())))
            return {**out, "__t0": np.full(rows, t0), "__t1": np.full(rows, time.time())}

    return TimedPredictor


def ray_bench(cases: list[Case], actors: list[int], samples: dict[str, int], rounds: int, cpus: int,
              batch_size: int = 8) -> list[dict[str, Any]]:
    """``kiln batch --actors N`` (:func:`kiln.ray.run_on_ray`) on a local Ray, per actor count: the job's
    wall time (actors starting and loading the artifact included) and the actors' steady throughput
    (samples over the span from the first batch's start to the last one's end)."""
    import ray

    import kiln.ray

    results = []
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    plain = kiln.ray.KilnPredictor
    kiln.ray.KilnPredictor = _timed_predictor()  # (kiln.ray.map_batches looks the class up when it runs)
    try:
        with tempfile.TemporaryDirectory(prefix="serve-load-ray-") as tmp:
            warm = True
            for case in cases:
                n = samples.get(case.key, samples.get("*", 64))
                rows = [case.feeds(i) for i in range(n)]
                src, dst = Path(tmp) / f"{case.key}.npz", Path(tmp) / "out.npz"
                np.savez(src, **{k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
                if warm:  # Ray's first job starts its worker processes; keep that out of the figures
                    kiln.ray.run_on_ray(case.artifact, src, dst, actors=max(actors), batch_size=batch_size)
                    warm = False
                runs: dict[int, list[tuple[float, float]]] = {a: [] for a in actors}
                for r in range(rounds):
                    for a in (actors if r % 2 == 0 else actors[::-1]):
                        t0 = time.perf_counter()
                        _, done = kiln.ray.run_on_ray(case.artifact, src, dst, actors=a, batch_size=batch_size)
                        job = time.perf_counter() - t0
                        with np.load(dst) as out:
                            span = float(out["__t1"].max() - out["__t0"].min())
                        assert done == n, (done, n)
                        runs[a].append((job, span))
                        print(f"[serve-load] ray {case.key} {a} actor(s) round {r + 1}: {n} samples, job {job:.2f} s "
                              f"({n / job:.1f} samples/s), batches over {span:.2f} s ({n / span:.1f} samples/s)",
                              flush=True)
                for a in actors:
                    job = statistics.median(j for j, _ in runs[a])
                    span = statistics.median(s for _, s in runs[a])
                    results.append({"model": case.key, "actors": a, "samples": n, "batch_size": batch_size,
                                    "job_s": job, "job_samples_per_s": n / job, "span_s": span,
                                    "samples_per_s": n / span, "rounds": runs[a]})
    finally:
        kiln.ray.KilnPredictor = plain
        ray.shutdown()
    return results


# -- report ----------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU model, and the cores this process may use."""
    from kiln.runtime.cpu import host_cpu_name

    return f"{host_cpu_name()}, {len(os.sched_getaffinity(0))} cores"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: how it was made, the figures table, the goals, and Ray's figures."""
    labels = report["labels"]
    lines = [
        "# kiln serve under load",
        "",
        f"- date: {report['date']}; machine: {report['cpu']}; load average {report['load_before']} before, "
        f"{report['load_after']} after; {report['minutes']:.1f} min",
        f"- command: `{report['command']}`",
        f"- {report['versions']}",
        f"- each cell: {report['clients_note']}; medians over {report['rounds']} alternating rounds; "
        "requests of one row (npz); latency is the client's, request sent to response read; rows/run and "
        "ms/run are the server's model runs (its /metrics)",
        *(["- the servers' outputs for one request agree within (max abs difference): " +
           ", ".join(f"{labels.get(k, k)} {v:.2g}" for k, v in report["agreement"].items())]
          if report.get("agreement") else []),
    ]
    if report["cells"]:
        lines += ["", "| model | engine | batching | clients | req/s | p50 ms | p99 ms | rows/run | ms/run "
                      "| client CPU ms/req | answered |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cells"]:
        bad = sum(c["errors"].values())
        answered = f"{c['ok']}/{c['sent']}" + (f" ({', '.join(f'{k}: {v}' for k, v in c['errors'].items())})"
                                               if bad else "")
        lines.append(f"| {labels.get(c['model'], c['model'])} | {c['engine']} | {c['batching']} | {c['clients']} "
                     f"| {c['throughput']:.1f} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['rows_per_run']:.1f} "
                     f"| {c['run_ms']:.2f} | {c['client_cpu_ms']:.2f} | {answered} |")
    if report["goals"]:
        lines += ["", "| model | goal | holds | figures |", "|---|---|---|---|"]
        lines += [f"| {labels.get(g['model'], g['model'])} | {g['goal']} | {'yes' if g['holds'] else '**no**'} "
                  f"| {g['detail']} |" for g in report["goals"]]
    if report.get("ray"):
        lines += ["", "| model (Ray, `kiln batch --actors N`) | actors | samples | batch size | job s | job samples/s "
                      "| batches s | actors' samples/s |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {labels.get(r['model'], r['model'])} | {r['actors']} | {r['samples']} | {r['batch_size']} "
                  f"| {r['job_s']:.2f} | {r['job_samples_per_s']:.1f} | {r['span_s']:.2f} | {r['samples_per_s']:.1f} |"
                  for r in report["ray"]]
    if report.get("ray_error"):
        lines += ["", f"The Ray measurement failed: {report['ray_error']}"]
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    """``1,8,32`` as a list of ints."""
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run the load test (and Ray's, with --ray), print and write the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve-onnx"]:
        return serve_onnx(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,bert", help="built-in models: resnet50, bert (default both)")
    ap.add_argument("--resnet-size", type=int, default=112,
                    help="the light ResNet-50's input resolution (default 112: a quarter of 224's work)")
    ap.add_argument("--onnx", type=Path, help="load-test this ONNX model instead (a symbolic leading dim batches)")
    ap.add_argument("--input-shape", action="append", default=[], metavar="NAME=Nx3x64x64",
                    help="with --onnx: pin or free input dims when compiling (a name makes a dim symbolic)")
    ap.add_argument("--engines", default="kiln,onnxruntime", help="kiln and/or onnxruntime (max batch 1)")
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated (default 1,8,32)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell (default 3)")
    ap.add_argument("--requests", type=int, default=800, help="at most this many requests per cell and round")
    ap.add_argument("--seconds", type=float, default=4.0, help="at most this long per cell and round (s)")
    ap.add_argument("--max-batch", type=int, default=8, help="kiln serve --max-batch with batching on (default 8)")
    ap.add_argument("--max-delay-ms", type=float, default=5.0, help="kiln serve --max-delay-ms (default 5)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="model threads per server (default: all cores)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up load on each server")
    ap.add_argument("--ray", action="store_true", help="also time kiln batch on a local Ray with 1 and 2 actors")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray measurement")
    ap.add_argument("--ray-actors", default="1,2")
    ap.add_argument("--ray-samples", default="resnet50=96,bert=4096,*=256", metavar="MODEL=N,...")
    ap.add_argument("--ray-rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kiln" / "serve-load",
                    help="compiled artifacts (default ~/.cache/kiln/serve-load)")
    ap.add_argument("--recompile", action="store_true", help="compile the artifacts again")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "SERVE_RESULTS.md", help="markdown report")
    ap.add_argument("--json", type=Path, help="also write the report as JSON")
    args = ap.parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.time()

    if args.onnx:
        cases = [_onnx_case(args.onnx, dict(_parse_shape(s) for s in args.input_shape) or None)]
    else:
        makers = {"resnet50": lambda: _resnet50(args.resnet_size), "bert": _bert}
        cases = [makers[m]() for m in args.models.split(",") if m]
    for case in cases:
        compile_case(case, args.cache, args.recompile)
    engines = args.engines.split(",")
    configs = ([Config("kiln", args.max_batch, args.max_delay_ms), Config("kiln", 1, args.max_delay_ms)]
               if "kiln" in engines else []) + ([Config("onnxruntime", 1, args.max_delay_ms)]
                                                if "onnxruntime" in engines else [])
    clients = _ints(args.clients)
    agreement: dict[str, float] = {}
    cells = [] if args.ray_only else load_test(cases, configs, clients, args.rounds, args.requests, args.seconds,
                                               args.threads, warmup=not args.no_warmup, agreement=agreement)
    ray_results: list[dict[str, Any]] = []
    ray_error = None
    if args.ray or args.ray_only:
        samples = {k: int(v) for k, v in (s.split("=") for s in args.ray_samples.split(","))}
        try:
            ray_results = ray_bench(cases, _ints(args.ray_actors), samples, args.ray_rounds, args.threads)
        except Exception as e:  # noqa: BLE001 - keep the serving figures; say what failed
            ray_error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"[serve-load] the Ray measurement failed: {ray_error}", file=sys.stderr, flush=True)

    from kiln import __version__

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("apache-tvm", "onnxruntime", "fastapi", "uvicorn",
                                                                "httpx"))
    report = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()), "minutes": (time.time() - start) / 60,
        "command": " ".join([".venv/bin/python", "bench/serve_load.py", *argv]),
        "versions": f"kiln {__version__} (O3, default schedules); {versions}; {args.threads} model threads per server",
        "clients_note": f"closed-loop clients, at most {args.requests} requests or {args.seconds:g} s",
        "rounds": args.rounds, "labels": {c.key: c.label for c in cases},
        "cells": [c.summary() for c in cells], "goals": check_goals(cells, args.max_delay_ms) if cells else [],
        "agreement": agreement, "ray": ray_results, "ray_error": ray_error,
    }
    text = markdown(report)
    print(text)
    for g in report["goals"]:
        print(f"goal {'HOLDS' if g['holds'] else 'FAILS'}: {g['model']}: {g['goal']}: {g['detail']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if ray_error else 0


if __name__ == "__main__":
    raise SystemExit(main())
