"""Tuning: MetaSchedule search over kiln's kernels, kept in a database on disk.

``kiln tune`` lowers a model exactly as ``kiln compile`` does, takes the prim funcs that
come out of fusion (the kernels), and searches schedules for the heaviest of them with
MetaSchedule. Every kernel first gets a record for kiln's default schedule, measured by the
same runner, so the database's best record for a kernel is never slower than the default:
where the search finds nothing better, compilation keeps the default.

The database is MetaSchedule's JSON database (one workload table, one record table, both
append-only), keyed by the kernel's structure, so models that share a kernel share its
records. Records are written as they are measured: a killed run loses at most the batch in
flight, and the next run starts its search from what is there. ``kiln-tune.json`` beside
the tables keeps the trials and seconds spent per tuning job, which is what a resumed run's
budget counts against.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kiln.codegen._tvm import skip_foreign_tensor_intrinsics, x86_tensor_intrinsics_only
from kiln.codegen.int8 import register_vnni_intrinsic
from kiln.codegen.lowering import CodegenError, lower
from kiln.codegen.schedule import apply_default_schedule, fusion_passes
from kiln.codegen.target import Target
from kiln.ir import Graph

log = logging.getLogger("kiln.tune")

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
PROGRESS = "kiln-tune.json"
MIN_TUNE_FLOPS = 1e6  # below this a kernel costs less to run than to tune
TRIALS_PER_ITER = 8  # candidates measured per round; the budget is checked between rounds


class TuningError(CodegenError):
    """A tuning database that cannot be used, or a tuning job that cannot start."""


RPC_SESSION_SECONDS = 60  # one candidate's upload and measurement on a remote runner


@dataclass(frozen=True)
class RPCTracker:
    """Where candidates are measured remotely: TVM's RPC tracker, and the key its runners registered with.

    Building stays on this machine; each built candidate goes to a runner the tracker hands
    out, which runs and times it and sends the times back.
    """

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str | None) -> "RPCTracker":
        """``HOST:PORT`` and a key, as ``kiln tune --rpc HOST:PORT --rpc-key KEY`` gives them."""
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TuningError(f"--rpc '{address}' must be the tracker's HOST:PORT, e.g. 127.0.0.1:9190")
        if not key:
            raise TuningError("--rpc needs --rpc-key KEY: the key the RPC servers registered with (rpc_server --key)")
        return cls(host.strip("[]"), int(port), key)

    def __str__(self) -> str:
        return f"key '{self.key}' at the RPC tracker {self.host}:{self.port}"

    def runner(self) -> tuple[Any, int]:
        """MetaSchedule's RPCRunner over every server registered with the key, and how many there are."""
        from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

        config = RPCConfig(tracker_host=self.host, tracker_port=self.port, tracker_key=self.key,
                           session_timeout_sec=RPC_SESSION_SECONDS)
        try:
            servers = config.count_num_servers(allow_missing=True)
        except Exception:  # noqa: BLE001 - TVM reports an unreachable tracker as a ValueError with a how-to
            raise TuningError(f"cannot reach the RPC tracker at {self.host}:{self.port}; start one with "
                              f"python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {self.port}") from None
        if servers == 0:
            raise TuningError(f"no RPC server is registered with {self}; on each measuring machine run "
                              f"python -m tvm.exec.rpc_server --tracker {self.host}:{self.port} --key {self.key}")
        return RPCRunner(config, max_workers=servers), servers


def workload(func: Any) -> Any:
    """The IRModule that names ``func`` in the database (``main``, as MetaSchedule builds it)."""
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def has_static_args(func: Any) -> bool:
    """Whether every argument of ``func`` has a static shape, which MetaSchedule needs to measure it."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    try:
        ArgInfo.from_prim_func(func)
    except Exception:  # noqa: BLE001 - TVM refuses a symbolic dim with a type error
        return False
    return True


@dataclass
class Kernel:
    """One distinct kernel of a model: a prim func after fusion, and how often the model runs it."""

    name: str
    func: Any
    weight: int
    flops: float

    @functools.cached_property
    def mod(self) -> Any:
        """The kernel's workload module in the database."""
        return workload(self.func)

    @functools.cached_property
    def key(self) -> str:
        """The kernel's structural hash, as the progress file keys it."""
        import tvm_ffi

        return f"{tvm_ffi.structural_hash(self.mod) & (2**64 - 1):016x}"


def fused_module(graph: Graph, target: Target) -> Any:
    """``graph`` lowered and fused: the module whose prim funcs compilation will schedule."""
    import tvm

    lowered = lower(graph, target.layout_block or 16, int8_pairs=not target.has_vnni)
    with tvm.target.Target(dict(target.tvm)):
        return tvm.transform.Sequential(fusion_passes())(lowered.module)


def tunable_kernels(mod: Any, *, min_flops: float = MIN_TUNE_FLOPS) -> list[Kernel]:
    """The distinct static kernels of ``mod`` worth tuning, heaviest (FLOPs x uses) first."""
    import tvm_ffi
    from tvm import tirx
    from tvm.s_tir.analysis import estimate_tir_flops

    kernels: list[Kernel] = []
    by_hash: dict[int, list[Kernel]] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or not has_static_args(func):
            continue
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
            continue
        h = tvm_ffi.structural_hash(func)
        same = next((k for k in by_hash.get(h, []) if tvm_ffi.structural_equal(k.func, func)), None)
        if same is not None:
            same.weight += 1
            continue
        try:
            flops = float(estimate_tir_flops(workload(func)))
        except Exception:  # noqa: BLE001 - funcs the estimator cannot read are not worth tuning
            flops = 0.0
        k = Kernel(gv.name_hint, func, 1, flops)
        by_hash.setdefault(h, []).append(k)
        kernels.append(k)
    kernels = [k for k in kernels if k.flops >= min_flops]
    kernels.sort(key=lambda k: -k.flops * k.weight)
    return kernels


def job_key(kernels: list[Kernel], target: Target) -> str:
    """A name for one tuning job (these kernels, this target) in the progress file."""
    import tvm_ffi

    h = hashlib.sha256(json.dumps(target.tvm, sort_keys=True).encode())
    for k in kernels:
        h.update(f"{tvm_ffi.structural_hash(k.func)}:{k.weight};".encode())
    return h.hexdigest()[:16]


class TuningDatabase:
    """A MetaSchedule JSON database in a directory, as kiln reads and writes it."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            if self.path.exists() and not self.path.is_dir():
                raise TuningError(f"{self.path}: exists and is not a directory; --db needs a directory")
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / WORKLOADS).is_file() or not (self.path / RECORDS).is_file():
            raise TuningError(f"{self.path}: not a tuning database (no {WORKLOADS} and {RECORDS}); "
                              "make one with kiln tune --db")
        from tvm.s_tir import meta_schedule as ms

        try:
            self.ms = ms.database.JSONDatabase(
                path_workload=str(self.path / WORKLOADS), path_tuning_record=str(self.path / RECORDS),
                allow_missing=create, module_equality="structural")
        except Exception as e:  # noqa: BLE001 - TVM reports a damaged table as a generic error
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise TuningError(f"{self.path}: the tuning database cannot be read ({first})") from None
        self.applied: dict[str, str] = {}  # kernel name -> "tuned" or "default", filled by lookup()
        register_vnni_intrinsic()  # records of int8 kernels tensorize with kiln's own intrinsic

    def sha256(self) -> str:
        """sha256 over both tables: the state of the database that a build used."""
        h = hashlib.sha256()
        for name in (WORKLOADS, RECORDS):
            h.update((self.path / name).read_bytes())
        return h.hexdigest()

    def best_seconds(self, mod: Any) -> float | None:
        """The best measured mean run time of ``mod``'s kernel, or None if it has no record."""
        if not self.ms.has_workload(mod):
            return None
        top = self.ms.get_top_k(self.ms.commit_workload(mod), 1)
        if not top or not top[0].run_secs:
            return None
        return _mean(top[0].run_secs)

    def lookup(self, target: Any) -> Callable[[str, Any], Any | None]:
        """A lookup for :func:`kiln.codegen.schedule.schedule_module`: a kernel's best schedule, or None."""

        def tuned(name: str, func: Any) -> Any | None:
            mod = workload(func)
            if not self.ms.has_workload(mod):
                return None
            try:
                sch = self.ms.query_schedule(mod, target, "main")
            except Exception as e:  # noqa: BLE001 - a record that no longer replays: keep the default
                log.warning("tuning record for %s does not apply (%s); using kiln's default schedule", name,
                            str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
                return None
            if sch is None:
                return None
            self.applied[name] = "default" if _is_default(mod, sch) else "tuned"
            return sch.mod["main"].without_attr("global_symbol")

        return tuned

    def manifest(self) -> dict[str, Any]:
        """What the artifact's manifest records about the database a build used."""
        tuned = sum(1 for v in self.applied.values() if v == "tuned")
        return {"sha256": self.sha256(), "kernels_from_database": len(self.applied),
                "kernels_tuned": tuned, "kernels_default_kept": len(self.applied) - tuned}


def _is_default(mod: Any, sch: Any) -> bool:
    """Whether ``sch`` is kiln's default schedule of ``mod`` (the search found nothing better)."""
    import tvm_ffi
    from tvm import s_tir

    default = s_tir.Schedule(mod)
    try:
        apply_default_schedule(default)
    except Exception:  # noqa: BLE001 - the default failed, so the database's schedule is a tuned one
        return False
    return bool(tvm_ffi.structural_equal(default.mod, sch.mod))


@dataclass
class TuneStatus:
    """Where a tuning job stands; passed to the progress callback after every measured batch."""

    kernels: list[Kernel]
    trials: int
    max_trials: int | None
    seconds: float
    budget_seconds: float | None
    default_seconds: dict[str, float] = field(default_factory=dict)  # per kernel name, one run
    best_seconds: dict[str, float] = field(default_factory=dict)

    def model_estimate(self, which: dict[str, float]) -> float:
        """Seconds per model run spent in the tuned kernels, by per-kernel times in ``which``."""
        return sum(which.get(k.name, 0.0) * k.weight for k in self.kernels)

    @property
    def fraction(self) -> float:
        """How much of the budget is spent, 0 to 1: trials or seconds, whichever is further along."""
        parts = []
        if self.max_trials:
            parts.append(self.trials / self.max_trials)
        if self.budget_seconds:
            parts.append(self.seconds / self.budget_seconds)
        return min(1.0, max(parts)) if parts else 0.0


@dataclass
class TuneReport:
    """What a tuning run did."""

    status: TuneStatus
    resumed: bool
    stopped_by: str


def _load_progress(db: TuningDatabase) -> dict[str, Any]:
    path = db.path / PROGRESS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TuningError(f"{path}: cannot be read ({e}); delete it to start the budget afresh") from None
    return data if isinstance(data, dict) else {}


def _save_progress(db: TuningDatabase, data: dict[str, Any]) -> None:
    path = db.path / PROGRESS
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _mean(run_secs: Any) -> float:
    """The mean of a record's measured run times, in seconds."""
    secs = [float(s) for s in run_secs]
    return sum(secs) / len(secs)


def _measure_defaults(kernels: list[Kernel], db: TuningDatabase, target: Any, builder: Any, runner: Any,
                      defaults: dict[str, float]) -> None:
    """Commit one record per kernel that has none: kiln's default schedule, measured.

    ``defaults`` (kernel hash -> seconds) receives each measured time.
    """
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    todo = []
    for k in kernels:
        if db.best_seconds(k.mod) is not None:
            continue
        sch = s_tir.Schedule(k.mod)
        try:
            apply_default_schedule(sch)
        except Exception:  # noqa: BLE001 - a failing default compiles unscheduled; measure that
            sch = s_tir.Schedule(k.mod)
        todo.append((k, sch))
    if not todo:
        return
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in todo])
    inputs, kept = [], []
    for (k, sch), b in zip(todo, built):
        if b.error_msg is None:
            inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", ArgInfo.from_prim_func(k.mod["main"])))
            kept.append((k, sch, b))
    for (k, sch, b), future in zip(kept, runner.run(inputs)):
        result = future.result()
        try:
            if result.error_msg is None and result.run_secs:
                wl = db.ms.commit_workload(k.mod)
                db.ms.commit_tuning_record(ms.database.TuningRecord(
                    sch.trace, wl, result.run_secs, target, ArgInfo.from_prim_func(k.mod["main"])))
                defaults[k.key] = _mean(result.run_secs)
        finally:
            if b.artifact_path and os.path.exists(b.artifact_path):
                os.remove(b.artifact_path)


def tune(
    graph: Graph,
    target: Target,
    db_dir: str | os.PathLike,
    *,
    budget_seconds: float | None = None,
    max_trials: int | None = None,
    max_kernels: int | None = None,
    seed: int = 0,
    on_status: Callable[[TuneStatus], None] | None = None,
    say: Callable[[str], None] | None = None,
    rpc: RPCTracker | None = None,
) -> TuneReport:
    """Tune ``graph``'s heaviest kernels for ``target`` into the database at ``db_dir``.

    The run stops when the job has used ``budget_seconds`` or ``max_trials`` in total, counting
    earlier runs of the same job on the same database (a killed run resumes), or when the
    search has nothing left to try. With ``rpc``, candidates (and kiln's default schedules) are
    measured on the remote runners registered with that tracker and key; building stays here.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    if target.kind != "cpu":
        raise TuningError("kiln tune measures on CPUs (this machine's, or RPC runners'), so it tunes only the CPU "
                          "target")
    if budget_seconds is None and max_trials is None:
        raise TuningError("give a tuning budget: --budget (e.g. 30m) and/or --trials")
    say = say or (lambda _: None)
    tvm_target = tvm.target.Target(dict(target.tvm))
    threads = int(target.tvm.get("num-cores") or os.cpu_count() or 1)

    say("extracting kernels")
    kernels = tunable_kernels(fused_module(graph, target))
    if not kernels:
        raise TuningError("the model has no kernel worth tuning (static shape, at least 1 MFLOP); "
                          "pin symbolic dims with --input-shape")
    if max_kernels is not None:
        kernels = kernels[:max_kernels]
    db = TuningDatabase(db_dir, create=True)
    key = job_key(kernels, target)
    progress = _load_progress(db)
    job = progress.setdefault("jobs", {}).setdefault(key, {"trials": 0, "seconds": 0.0})
    resumed = job["trials"] > 0 or job["seconds"] > 0
    status = TuneStatus(kernels, int(job["trials"]), max_trials, float(job["seconds"]), budget_seconds)

    _quiet_metaschedule()
    builder = ms.Builder.create("local", max_workers=threads, initializer=skip_foreign_tensor_intrinsics)
    if rpc is None:
        runner = ms.Runner.create("local", max_workers=1)
        job["runner"] = "local"
    else:
        runner, servers = rpc.runner()
        say(f"measuring on {servers} RPC server(s) with {rpc}")
        job["runner"] = f"rpc {rpc.host}:{rpc.port} key {rpc.key}"
    start_seconds, start = status.seconds, time.monotonic()  # the budget counts from here
    say(f"measuring kiln's default schedules of {len(kernels)} kernels")
    defaults = progress.setdefault("default_seconds", {})
    with tvm_target:  # kiln's schedules read the target (the int8 conv needs VNNI)
        _measure_defaults(kernels, db, tvm_target, builder, runner, defaults)
    for k in kernels:
        best = db.best_seconds(k.mod)
        if best is not None:
            status.best_seconds[k.name] = best
        if k.key in defaults:
            status.default_seconds[k.name] = defaults[k.key]
    status.seconds = start_seconds + time.monotonic() - start
    job.update(seconds=round(status.seconds, 3))
    _save_progress(db, progress)
    if on_status:
        on_status(status)

    def out_of_budget() -> str | None:
        if max_trials is not None and status.trials >= max_trials:
            return "trials"
        if budget_seconds is not None and status.seconds >= budget_seconds:
            return "time"
        return None

    kernel_trials = job.setdefault("kernel_trials", {})

    def record(k: Kernel, measured: int) -> None:
        status.trials += measured
        status.seconds = start_seconds + time.monotonic() - start
        best = db.best_seconds(k.mod)
        if best is not None:
            status.best_seconds[k.name] = best
        kernel_trials[k.key] = kernel_trials.get(k.key, 0) + measured
        job.update(trials=status.trials, seconds=round(status.seconds, 3))
        _save_progress(db, progress)
        if on_status:
            on_status(status)

    current: list[Kernel] = []

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, candidates: Any, builds: Any, runs: Any) -> None:
            record(current[0], len(candidates))

    cost_model = ms.CostModel.create("xgb", num_tuning_cores=threads)
    callbacks = [*ms.MeasureCallback.create("default"), Progress()]
    exhausted: set[str] = set()
    if out_of_budget() is None:
        say(f"tuning {len(kernels)} kernels" + (" (resuming)" if resumed else ""))
    with x86_tensor_intrinsics_only():
        while (stopped := out_of_budget()) is None:
            alive = [k for k in kernels if k.name not in exhausted]
            if not alive:
                stopped = "search exhausted"
                break
            k = _next_kernel(alive, status, kernel_trials)
            n = TRIALS_PER_ITER if max_trials is None else min(TRIALS_PER_ITER, max_trials - status.trials)
            before = status.trials
            current[:] = [k]
            ctx = ms.TuneContext(mod=k.mod, target=tvm_target, space_generator="post-order-apply",
                                 search_strategy="evolutionary", task_name=k.name,
                                 rand_state=seed + status.trials, num_threads=threads).clone()
            ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(db.path), max_trials_global=n,
                          num_trials_per_iter=n, builder=builder, runner=runner, database=db.ms,
                          cost_model=cost_model, measure_callbacks=callbacks, task_scheduler="round-robin")
            if status.trials == before:
                exhausted.add(k.name)
    return TuneReport(status, resumed, stopped)


def _next_kernel(alive: list[Kernel], status: TuneStatus, kernel_trials: dict[str, int]) -> Kernel:
    """The kernel to search next: each gets one round first, then the one with most time at stake.

    The time at stake is the kernel's share of a model run (best time x uses), discounted by
    the rounds it has had, so a heavy kernel gets more rounds without starving the others.
    """
    fresh = [k for k in alive if kernel_trials.get(k.key, 0) == 0]
    if fresh:
        return fresh[0]

    def stake(k: Kernel) -> float:
        best = status.best_seconds.get(k.name, 1.0)
        return best * k.weight / (1 + kernel_trials.get(k.key, 0) / TRIALS_PER_ITER)

    return max(alive, key=stake)


def _quiet_metaschedule() -> None:
    """MetaSchedule logs every round to the console; kiln shows its own progress instead."""
    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logging.getLogger(name).setLevel(logging.WARNING)
