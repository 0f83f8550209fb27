"""Differential conformance: generated graphs compiled by kiln against onnxruntime (tools/conformance.py).

Each named test below is one of the silent wrong results, internal errors or refused op families that
kiln had: the cases of the generator that cover it must now match onnxruntime. A seeded sample of
one case per spec guards the rest; the full sweep is ``.venv/bin/python tools/conformance.py``, which
writes docs/conformance.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import conformance  # noqa: E402

#: issue item -> a regular expression over case names (the cases that cover it)
ITEMS = {
    # silent wrong results
    "quantize_linear_opset10_shape1_parameters": r"^QuantizeLinear/v10/.*/shape\[1\]",
    "dequantize_linear_opset10_shape1_parameters": r"^DequantizeLinear/v10/.*/shape\[1\]",
    "quantize_dequantize_per_tensor_and_per_axis": r"^(Quantize|Dequantize)Linear/v(13|19|21|2[3-6])/",
    "max_unpool_kernels_strides_pads_output_shape": r"^MaxUnpool/",
    "nonzero": r"^NonZero/",
    "compress": r"^Compress/",
    "resize_tf_crop_and_resize_with_roi_at_run_time": r"^Resize/.*/tf_crop_and_resize/.*r",
    "clip_nan_bounds_are_no_bounds": r"^Clip/v1[23]/.*nan",
    "reduce_empty_axes_noop_with_empty_axes": r"^Reduce[A-Za-z]+/.*(empty-axes|no-axes)",
    "batch_normalization_nan_epsilon_and_nan_inputs": r"^BatchNormalization/.*nan",
    # internal errors on valid graphs
    "split": r"^Split/",
    "squeeze_axes_at_run_time": r"^Squeeze/.*/r",
    "slice_starts_at_run_time": r"^Slice/.*/r",
    "global_average_pool_rank3": r"^GlobalAveragePool/.*\[1, 3, 5\]",
    "global_max_pool_rank3": r"^GlobalMaxPool/.*\[1, 3, 5\]",
    # op families that were refused
    "unique": r"^Unique/",
    "non_max_suppression": r"^NonMaxSuppression/",
    "roi_align": r"^RoiAlign/",
    "max_roi_pool": r"^MaxRoiPool/",
    "global_lp_pool": r"^GlobalLpPool/",
    "tile_repeats_at_run_time": r"^Tile/.*/r",
    "optional": r"^optional/",
    "sequences_inside_the_graph_and_as_inputs_and_outputs": r"^sequences/",
}

#: cases kiln refuses on purpose, with the start of the one-line reason it must give
REFUSED = {
    # the output's shape would follow the run-time position over elements of different shapes
    "sequences/v17/sequence-input-at-length": "SequenceAt with a run-time position needs elements of one static shape",
}


def _cases(pattern: str) -> list[conformance.Case]:
    rx = re.compile(pattern)
    return [c for c in conformance.all_cases() if rx.search(c.name)]


def _failures(cases: list[conformance.Case]) -> tuple[list[str], int]:
    """(what went wrong, one line per case; how many cases were compared)."""
    bad, compared = [], 0
    for case in cases:
        r = conformance.run_case(case)
        if r.outcome == "skipped":
            continue
        compared += 1
        want = REFUSED.get(case.name)
        if want is not None:
            if r.outcome != "refused" or want not in r.detail:
                bad.append(f"{case.name}: expected the refusal '{want}...', got {r.outcome}: {r.detail}")
        elif r.outcome != "match":
            bad.append(f"{case.name}: {r.outcome}: {r.detail}")
    return bad, compared


@pytest.mark.parametrize("item", sorted(ITEMS))
def test_item_matches_onnxruntime(item):
    cases = _cases(ITEMS[item])
    assert cases, f"no generated case covers {item}"
    bad, compared = _failures(cases)
    assert compared, f"onnxruntime ran none of the {len(cases)} cases of {item}"
    assert not bad, f"{len(bad)} of {compared} cases of {item}:\n" + "\n".join(bad)


def test_seeded_sample_of_every_spec_matches_onnxruntime():
    cases = conformance.sample(seed=0)
    assert len({c.op for c in cases}) == len(conformance.SPECS)
    bad, compared = _failures(cases)
    assert compared > len(cases) // 2
    assert not bad, f"{len(bad)} of {compared} sampled cases:\n" + "\n".join(bad)


def test_every_lowered_op_has_a_spec():
    missing = sorted(set(conformance.lowered_ops()) - conformance.ops_in(conformance.all_cases()))
    assert not missing, f"ops kiln lowers that the generator never builds: {', '.join(missing)}"


def test_a_silent_mismatch_is_reported_as_one():
    # the comparison itself: a wrong value, a wrong dtype and a missing output are each a difference
    import numpy as np

    want = {"y": np.array([1.0, np.nan], np.float32)}
    assert conformance.differs({"y": np.array([1.0, np.nan], np.float32)}, want, None) == ""
    assert "1 of 2 values differ" in conformance.differs({"y": np.array([1.5, np.nan], np.float32)}, want, None)
    assert "1 of 2 values differ" in conformance.differs({"y": np.array([1.0, 0.0], np.float32)}, want, None)
    assert "float64" in conformance.differs({"y": np.array([1.0, np.nan])}, want, None)
    assert "outputs" in conformance.differs({}, want, None)
