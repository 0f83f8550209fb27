"""``kiln report``: one self-contained page, opened in a real browser (headless Chromium).

The browser test loads the page from disk with its console logged: a script error or a blocked
fetch (the page's Content-Security-Policy allows none) would be a console message. The DOM after
the scripts ran must hold both graph pictures, the charts and the tables; a screenshot is taken.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kiln.cli import main
from kiln.driver import load_model
from kiln.report.graphs import render, to_dot
from models import MODELS
from test_check import cached_artifact
from test_transformers import FEEDS, tiny_models  # noqa: F401 - the fixture that exports the tiny BERT

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed (make test installs it)")
BROWSER = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=5000"]


def open_in_chromium(page: Path, screenshot: Path | None = None) -> str:
    """The DOM of ``page`` after its scripts ran; fails on any console message (errors, blocked fetches)."""
    proc = subprocess.run([*BROWSER, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    if screenshot is not None:
        subprocess.run([*BROWSER, "--window-size=1400,2200", f"--screenshot={screenshot}", page.as_uri()],
                       capture_output=True, text=True, timeout=180, check=True)
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    return proc.stdout


def _assert_rendered(dom: str, html: str) -> None:
    assert 'data-ready="1"' in dom  # the page's script ran to its end
    assert re.search(r'<g id="before" class="graph"', dom) and re.search(r'<g id="after" class="graph"', dom)
    assert dom.count('class="chart"') >= 2  # time share, and GFLOP/s against the peak
    for section in ("summary", "passes", "rules", "graphs", "kernels"):
        assert f'<section id="{section}"' in dom
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html)  # nothing to fetch
    assert "<script src" not in html and "<link" not in html


@needs_browser
@needs_dot
def test_report_on_yolov8n_opens_in_chromium(real_model, tmp_path, capsys):
    path = real_model("yolov8n")
    art = cached_artifact(path, "yolov8n", dict(MODELS["yolov8n"].inputs))
    page = tmp_path / "yolov8n.html"
    assert main(["report", str(path), "--artifact", str(art), "-o", str(page), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {page}" in out and "check passed" in out
    html = page.read_text()
    dom = open_in_chromium(page, tmp_path / "yolov8n.png")
    _assert_rendered(dom, html)
    assert "conv-silu" in dom and "kiln::BlockedConv" in dom  # O3's rules and the kernels' ops
    assert '<section id="check"' in dom and "all outputs agree" in dom
    assert "GFLOP/s" in dom and "numpy float32 matmul" in dom  # how the peak was measured


@needs_browser
@needs_dot
def test_report_on_the_tiny_bert_opens_in_chromium(tiny_models, tmp_path, capsys):  # noqa: F811
    path = tiny_models / "bert.onnx"
    npz = tmp_path / "in.npz"
    np.savez(npz, **FEEDS["bert"])
    page = tmp_path / "bert.html"
    assert main(["report", str(path), "-o", str(page), "--inputs", str(npz), "--check",
                 "--input-shape", "input_ids=1x16", "--input-shape", "attention_mask=1x16"]) == 0
    dom = open_in_chromium(page, tmp_path / "bert.png")
    _assert_rendered(dom, page.read_text())
    assert "attention-sdpa-masked" in dom and "kiln::Attention" in dom


@needs_dot
def test_compile_writes_the_report_of_an_int8_artifact(tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(1).normal(0, 1, (8, 3, 64, 64)).astype(np.float32))
    page, art = tmp_path / "tiny8.html", tmp_path / "tiny8.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(art), "--input-shape", "input=1x3x64x64", "--quantize", "int8",
                 "--calib", str(calib), "--exclude", "fc", "--report", str(page)]) == 0
    html = page.read_text()
    assert '<section id="int8"' in html and "Accuracy against the float model" in html
    assert re.search(r'<td class="mono">fc</td><td>--exclude</td>', html)  # the layer kept in float, and why
    assert "fuse-conv" in html and '<g id="after" class="graph"' in html  # the compile's own pipeline run


def test_a_report_never_overwrites_its_inputs(tmp_path, capsys):
    art = tmp_path / "t.kiln"
    assert main(["compile", str(EXAMPLE), "-o", str(art), "--report", str(art)]) == 2
    assert "the report would overwrite" in capsys.readouterr().err and not art.exists()
    assert main(["report", str(EXAMPLE), "-o", str(EXAMPLE)]) == 2


@pytest.mark.parametrize("name, most_boxes", [("light_densenet121", 150), ("yolov8n", 140)])
def test_long_chains_collapse_so_a_big_graph_stays_readable(name, most_boxes, real_model):
    """DenseNet-121 imports as 910 nodes; drawn, its dense layers are one box each."""
    graph = load_model(real_model(name), dict(MODELS[name].inputs))
    dot, boxes, chains = to_dot(graph, "g")
    assert len(graph.nodes) > 300 and boxes <= most_boxes and chains > 30
    assert dot.count("->") >= boxes - len(graph.inputs)  # every box stays connected
    if shutil.which("dot"):
        pic = render(graph, "g")
        assert pic.svg is not None and pic.svg.startswith("<svg") and pic.boxes == boxes
