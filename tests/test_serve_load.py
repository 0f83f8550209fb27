"""``bench/serve_load.py`` at a tiny bound: every request answered, and figures that make sense (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="httpx (the serve extra's client) is not installed")

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "bench" / "serve_load.py"
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"


def test_the_load_tool_answers_every_request_and_reports_sane_figures(tmp_path):
    report_json, report_md = tmp_path / "report.json", tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--onnx", str(EXAMPLE), "--clients", "1,8", "--requests", "24", "--seconds", "5",
         "--rounds", "1", "--cache", str(tmp_path / "cache"), "--out", str(report_md), "--json", str(report_json)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(report_json.read_text())

    cells = report["cells"]
    assert {(c["engine"], c["max_batch"], c["clients"]) for c in cells} == {
        (engine, batch, clients) for engine, batch in [("kiln", 8), ("kiln", 1), ("onnxruntime", 1)]
        for clients in (1, 8)}
    for c in cells:
        assert c["errors"] == {} and c["sent"] > 0 and c["ok"] == c["sent"], c  # every request got a 200
        assert c["sent"] <= 24
        assert c["throughput"] > 0 and c["p50_ms"] > 0 and c["p99_ms"] >= c["p50_ms"], c
        assert 1 <= c["rows_per_run"] <= c["max_batch"], c  # from the server's /metrics
        assert c["run_ms"] > 0
    assert report["agreement"]["tiny_cnn"] < 1e-4  # kiln and onnxruntime behind the same server agree
    assert {g["goal"] for g in report["goals"]} == {
        "batching at 8 clients >= 1.5x the throughput of none",
        "p99 at 1 clients <= max-delay + 2 batch runs", "p99 at 8 clients <= max-delay + 2 batch runs"}
    text = report_md.read_text()
    assert "| model | engine | batching | clients | req/s | p50 ms | p99 ms |" in text
    assert text.count("| tiny_cnn.onnx |") == len(cells) + len(report["goals"])
    assert report["cpu"] in text and "goal" in proc.stdout
