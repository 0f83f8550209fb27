"""The runtime under load and at its edges: threads sharing one model, odd inputs as onnxruntime takes them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import kiln
import kiln.runtime
from kiln.ir.oracle import run_onnxruntime

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
sys.path.insert(0, str(REPO / "tools"))

import soak  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("load") / "tiny.kiln"
    kiln.compile(EXAMPLE, path)  # symbolic batch
    return path


def test_threads_share_one_model_bit_exact_without_leaking(artifact):
    first = soak.soak(artifact, callers=8, calls=150, throughput_calls=100)
    assert first.mismatches == 0
    assert first.rss_growth < 0.05, first
    second = soak.soak(artifact, callers=8, calls=150, throughput_calls=100)
    assert second.mismatches == 0
    # runner threads (and their TVM pools) are made once per process, not per caller thread
    assert second.os_threads_after <= first.os_threads_after


def _rng_input(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 64, 64)).astype(np.float32)


def _same_as_onnxruntime(model, x: np.ndarray) -> None:
    want = run_onnxruntime(str(EXAMPLE), {"input": np.ascontiguousarray(x)})
    got = model.run({"input": x})
    for name, ref in want.items():
        assert got[name].shape == ref.shape and got[name].dtype == ref.dtype
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_inputs_that_are_not_c_contiguous_or_are_read_only(artifact):
    model = kiln.runtime.load(artifact)
    x = _rng_input()
    _same_as_onnxruntime(model, np.asfortranarray(x))
    _same_as_onnxruntime(model, np.stack([x, -x], axis=-1)[..., 0])  # a strided view
    ro = x.copy()
    ro.flags.writeable = False
    _same_as_onnxruntime(model, ro)
    np.testing.assert_array_equal(ro, x)  # the caller's array is never written


def test_nan_and_infinite_inputs_give_what_onnxruntime_gives(artifact):
    x = _rng_input()
    x[0, 1, 5, 7] = np.nan
    x[1, 0, 30, 30] = np.inf
    x[1, 2, 40:44, 3] = -np.inf
    _same_as_onnxruntime(kiln.runtime.load(artifact), x)


def test_a_zero_size_batch_gives_empty_outputs(artifact):
    _same_as_onnxruntime(kiln.runtime.load(artifact), np.zeros((0, 3, 64, 64), np.float32))


def test_runs_split_the_cores_when_several_are_in_flight():
    """One run alone gets the model's full width; with more runs in flight than cores, each gets one
    core; a run's block of cores is never shared with another run."""
    from kiln.runtime.cores import Cores, _block

    cores = Cores([0, 1, 2, 3])
    assert cores.width(4) == 4  # nothing else in flight
    with cores.in_flight_run():
        assert cores.width(4) == 4  # this run alone
        with cores.in_flight_run():
            assert cores.width(4) == 2 and cores.width(1) == 1
            with cores.in_flight_run(), cores.in_flight_run(), cores.in_flight_run():
                assert cores.width(4) == 1
    assert [list(_block(2, k, 4)) for k in range(2)] == [[0, 1], [2, 3]] and list(_block(8, 0, 4)) == [0, 1, 2, 3]

    import threading
    order: list[str] = []
    with cores.hold(range(0, 2)):
        t = threading.Thread(target=lambda: cores.hold(range(1, 3)).__enter__() or order.append("second"))
        t.start()
        t.join(0.2)
        order.append("first released")  # the second run waits while core 1 is held
    t.join(5)
    assert order == ["first released", "second"]


def test_many_callers_run_single_core_streams_bit_exact(artifact):
    """8 callers on a multi-core host run side by side on one core each (the soak checks the outputs bit
    for bit against one caller's), instead of queueing for the full-width run."""
    from kiln.runtime import cores

    if cores.CORES.count < 2:
        pytest.skip("one core: every run is single-threaded anyway")
    report = soak.soak(artifact, callers=8, calls=60, throughput_calls=40)
    assert report.mismatches == 0
    assert 1 in cores._POOLS and cores.CORES.count in cores._POOLS
