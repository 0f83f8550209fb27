"""``kiln tune`` and ``kiln compile --tune-db``: the database, its use, and resuming a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kiln
import kiln.runtime
from kiln.check import compare
from kiln.cli import main, parse_duration
from kiln.codegen.build import build
from kiln.codegen.target import cpu_target
from kiln.errors import KilnError
from kiln.ir import set_input_shapes
from kiln.passes import PassManager
from kiln.passes.pipeline import passes_for
from helpers import ort_outputs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
SHAPE = (1, 3, 64, 64)


def _graph():
    g = kiln.load(EXAMPLE)
    set_input_shapes(g, {"input": SHAPE})
    g, _ = PassManager(passes_for("O3", block=cpu_target().layout_block)).run(g)
    return g


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _matches_onnxruntime(artifact: Path) -> None:
    got = kiln.runtime.load(artifact).run({"input": _x()})
    cmp = compare("kiln vs ort", got, ort_outputs(str(EXAMPLE), {"input": _x()}), rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("1.5m", 90)])
def test_budget_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30 minutes", "m30", "1x"])
def test_bad_budget_is_refused(text):
    with pytest.raises(KilnError, match="not a duration"):
        parse_duration(text)


def test_compile_refuses_a_directory_that_is_not_a_database(tmp_path, capsys):
    (tmp_path / "db").mkdir()
    code = main(["compile", str(EXAMPLE), "-o", str(tmp_path / "m.kiln"), "--tune-db", str(tmp_path / "db")])
    assert code == 2
    err = capsys.readouterr().err
    assert "not a tuning database" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.kiln").exists()


def test_tune_needs_a_budget_and_static_shapes(tmp_path, capsys):
    assert main(["tune", str(EXAMPLE), "--db", str(tmp_path / "db")]) == 2
    assert "give a tuning budget" in capsys.readouterr().err
    assert main(["tune", str(EXAMPLE), "--db", str(tmp_path / "db"), "--trials", "4"]) == 2
    assert "pin symbolic dims with --input-shape" in capsys.readouterr().err


def _database_with(tmp_path: Path, tuned_seconds: float):
    """A database holding the heaviest conv's default schedule (10 us) and another one."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    import tvm
    from kiln.codegen.schedule import apply_default_schedule, schedule_generic
    from kiln.codegen.tune import TuningDatabase, fused_module, tunable_kernels

    target = cpu_target()
    kernels = tunable_kernels(fused_module(_graph(), target))
    assert kernels and all(k.flops >= 1e6 for k in kernels)
    k = kernels[0]
    db = TuningDatabase(tmp_path / "db", create=True)
    wl = db.ms.commit_workload(k.mod)
    args = ArgInfo.from_prim_func(k.mod["main"])
    tvm_target = tvm.target.Target(dict(target.tvm))
    default = s_tir.Schedule(k.mod)
    with tvm_target:  # as kiln tune and kiln compile apply it: the register tiles follow the target
        apply_default_schedule(default)
    other = s_tir.Schedule(k.mod)  # a valid schedule that is not kiln's: the generic one
    assert schedule_generic(other)
    for sch, secs in ((default, 1e-5), (other, tuned_seconds)):
        db.ms.commit_tuning_record(ms.database.TuningRecord(sch.trace, wl, [secs], tvm_target, args))
    return k


@pytest.mark.parametrize("tuned_seconds, tuned", [(1e-6, 1), (1e-4, 0)])
def test_compile_takes_the_fastest_record_and_still_matches(tmp_path, tuned_seconds, tuned):
    from kiln.codegen.tune import TuningDatabase

    _database_with(tmp_path, tuned_seconds)
    db = TuningDatabase(tmp_path / "db")  # read back from disk, as kiln compile does
    out = tmp_path / "m.kiln"
    build(_graph(), out, tuning_db=db)
    info = kiln.runtime.load(out).manifest["tuning_db"]
    assert info["kernels_from_database"] == 1
    assert info["kernels_tuned"] == tuned and info["kernels_default_kept"] == 1 - tuned
    assert info["sha256"] == db.sha256()
    _matches_onnxruntime(out)


def _records(db: Path) -> list[str]:
    path = db / "database_tuning_record.json"
    return path.read_text().splitlines() if path.exists() else []


def _progress(db: Path) -> dict:
    try:
        return json.loads((db / "kiln-tune.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _tune_cmd(db: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "kiln.cli", "tune", str(EXAMPLE), "--db", str(db), "--trials", str(trials),
            "--kernels", "1", "--input-shape", "input=1x3x64x64"]


@pytest.mark.slow
def test_tune_is_killed_resumes_and_the_compiled_result_matches(tmp_path):
    """A few real MetaSchedule trials on the bundled example: kill the run, resume it, compile."""
    db = tmp_path / "db"
    proc = subprocess.Popen(_tune_cmd(db, 12), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        # the first round measures 8 candidates; kill the run while it searches the rest
        while time.monotonic() < deadline and proc.poll() is None:
            jobs = _progress(db).get("jobs", {})
            if any(j.get("trials", 0) >= 8 for j in jobs.values()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_records = _records(db)
    assert len(killed_records) >= 2  # kiln's default schedule and at least one searched candidate
    (job,) = _progress(db)["jobs"].values()
    assert job["trials"] == 8 and job["seconds"] > 0

    done = subprocess.run(_tune_cmd(db, 12), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "12 trials" in done.stdout and "(resumed)" in done.stdout, done.stdout
    assert "(resuming)" in done.stderr
    records = _records(db)
    assert records[: len(killed_records)] == killed_records  # kept, not remeasured or rewritten
    assert len(records) > len(killed_records)
    (job,) = _progress(db)["jobs"].values()
    assert job["trials"] == 12
    workloads = (db / "database_workload.json").read_text().splitlines()
    assert len(workloads) == 1  # one kernel tuned, its workload stored once

    out = tmp_path / "tuned.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(out), "--tune-db", str(db),
                 "--input-shape", "input=1x3x64x64"]) == 0
    from kiln.codegen.tune import TuningDatabase

    info = kiln.runtime.load(out).manifest["tuning_db"]
    assert info["sha256"] == TuningDatabase(db).sha256()
    assert info["kernels_from_database"] == 1
    _matches_onnxruntime(out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tune_measures_on_rpc_servers_through_a_tracker(tmp_path):
    """TVM's own tracker and two RPC servers on 127.0.0.1: the candidates are measured there, the
    records come back into the local database, and the compiled result matches."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (the rpc extra: pip install -e '.[rpc]')")
    tracker_port, key = _free_port(), "kiln-test"
    procs, logs = [], []
    try:
        def start(args: list[str], log: Path) -> None:
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", *args], stdout=log.open("w"),
                                          stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True))

        start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker_port),
               "--port-end", str(tracker_port + 1)], tmp_path / "tracker.log")
        time.sleep(2)
        for i in range(2):
            port = _free_port()
            start(["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{tracker_port}", "--key", key,
                   "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)], tmp_path / f"server{i}.log")
        db = tmp_path / "db"
        cmd = [*_tune_cmd(db, 8), "--rpc", f"127.0.0.1:{tracker_port}", "--rpc-key", key]
        deadline = time.monotonic() + 60
        while True:  # until both servers have registered with the tracker
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
            if "measuring on 2 RPC server(s)" in done.stderr or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert done.returncode == 0, done.stderr
        assert "measuring on 2 RPC server(s)" in done.stderr and "8 trials" in done.stdout, done.stderr
        (job,) = _progress(db)["jobs"].values()
        assert job["runner"] == f"rpc 127.0.0.1:{tracker_port} key {key}" and job["trials"] == 8
        served = [log.read_text().count("load_module") for log in logs[1:]]
        assert all(n >= 1 for n in served) and sum(served) >= 9, served  # the default and 8 candidates
        assert len(_records(db)) == 9
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    out = tmp_path / "tuned.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(out), "--tune-db", str(db),
                 "--input-shape", "input=1x3x64x64"]) == 0
    _matches_onnxruntime(out)
