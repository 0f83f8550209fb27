"""A seeded sample of the fuzzing campaign (tools/fuzz.py): mutated models through import -> passes ->
compile -> run, every outcome classified against onnxruntime."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import fuzz  # noqa: E402

@pytest.fixture(scope="module")
def sample():
    return fuzz.campaign(200, seed=20261202, workers=2, timeout=180)


def test_mutations_are_varied(sample):
    kinds = {m.split(" ")[0] for o in sample for m in o.mutations}
    assert len(sample) == 200 and len(kinds) >= 8 and len({o.seed for o in sample}) >= 8


@pytest.mark.parametrize("bad", ["crash", "hang", "internal", "mismatch"])
def test_no_case_crashes_hangs_or_goes_wrong(sample, bad):
    hits = [f"case {o.index} ({o.seed}: {'; '.join(o.mutations)}): {o.kiln} | onnxruntime: {o.onnxruntime}"
            for o in sample if o.outcome == bad]
    assert hits == []


def test_every_refusal_is_one_line(sample):
    refused = [o for o in sample if o.outcome == "refused"]
    assert refused and all("\n" not in o.kiln and o.kiln for o in refused)


def test_kiln_accepts_what_onnxruntime_refuses_only_for_a_stated_reason(sample):
    unexplained = [f"case {o.index}: {o.onnxruntime}" for o in sample
                   if o.outcome == "accepted, onnxruntime refuses" and fuzz.why_valid(o) is None]
    assert unexplained == []


def test_the_harness_sees_crashes_and_hangs(tmp_path):
    """The classification itself: a worker that dies is a crash, one that stalls is a hang."""
    pool = fuzz.Pool(1, timeout=5)
    out: list[fuzz.Outcome] = []
    try:
        pool.run([fuzz.Case(0, "probe", ["crash"], b"__crash__"), fuzz.Case(1, "probe", ["hang"], b"__hang__")],
                 out.append)
    finally:
        pool.close()
    assert sorted(o.outcome for o in out) == ["crash", "hang"]
