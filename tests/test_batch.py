"""``kiln batch`` and ``kiln.ray``: an artifact over files of samples, in one process and on a local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kiln
import kiln.runtime
from kiln.batch import run_samples
from kiln.cli import main
from kiln.ir.oracle import compare
from helpers import ort_outputs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny_cnn.onnx"
SAMPLES = 21  # not a multiple of the batch size: the last batch is short


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch") / "tiny.kiln"
    kiln.compile(EXAMPLE, path)
    return path


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((SAMPLES, 3, 64, 64)).astype(np.float32), id=np.arange(SAMPLES) * 10)
    return path


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _matches_onnxruntime(outputs: dict, x: np.ndarray) -> None:
    cmp = compare("batch vs onnxruntime", {"probs": outputs["probs"]}, ort_outputs(str(EXAMPLE), {"input": x}),
                  rtol=1e-4, atol=1e-5)
    assert cmp.passed, cmp.max_abs


def test_a_job_in_this_process_matches_onnxruntime(artifact, samples, tmp_path, capsys):
    out = tmp_path / "out.npz"
    assert main(["batch", str(artifact), "--input", str(samples), "--output", str(out), "--batch-size", "4"]) == 0
    assert f"probs[{SAMPLES}, 10]" in capsys.readouterr().out
    got, given = _load(out), _load(samples)
    _matches_onnxruntime(got, given["input"])
    assert np.array_equal(got["id"], given["id"])  # columns that are not inputs pass through


def test_a_static_model_takes_whole_samples_or_rows_of_its_leading_1(tmp_path):
    static = tmp_path / "static.kiln"
    kiln.compile(EXAMPLE, static, input_shapes={"input": (1, 3, 64, 64)})
    model = kiln.runtime.load(static)
    x = np.random.default_rng(1).standard_normal((5, 3, 64, 64)).astype(np.float32)
    rows = run_samples(model, {"input": x})
    assert rows["probs"].shape == (5, 10)
    _matches_onnxruntime(rows, x)
    whole = run_samples(model, {"input": x[:, None]})  # [S, 1, 3, 64, 64]: whole model inputs
    assert whole["probs"].shape == (5, 1, 10)
    np.testing.assert_array_equal(whole["probs"][:, 0], rows["probs"])


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((2, 3, 64, 64), np.float32)}, "no samples for input(s) input"),
    ({"input": np.zeros((2, 64, 64), np.float32)}, "want [S,3,64,64]"),
    ({"input": np.zeros((2, 3, 64, 64), np.float64)}, "dtype float64"),
])
def test_samples_that_do_not_fit_are_refused_in_one_line(artifact, tmp_path, capsys, arrays, message):
    src = tmp_path / "bad.npz"
    np.savez(src, **arrays)
    assert main(["batch", str(artifact), "--input", str(src), "--output", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.npz").exists()


def test_the_input_is_never_overwritten_and_bad_files_are_named(artifact, samples, tmp_path, capsys):
    before = samples.read_bytes()
    assert main(["batch", str(artifact), "--input", str(samples), "--output", str(samples)]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err and samples.read_bytes() == before
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not a zip")
    assert main(["batch", str(artifact), "--input", str(junk), "--output", str(tmp_path / "o.npz")]) == 2
    assert "not a readable .npz file" in capsys.readouterr().err


# -- Ray -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed (the ray extra: pip install -e '.[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (ray[data])")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single_process(artifact, samples) -> dict[str, np.ndarray]:
    return run_samples(kiln.runtime.load(artifact), _load(samples), batch_size=8)


def test_ray_actors_give_every_output_of_a_single_process_run(local_ray, artifact, samples, single_process, tmp_path,
                                                              capsys):
    out = tmp_path / "ray.npz"
    assert main(["batch", str(artifact), "--input", str(samples), "--output", str(out), "--actors", "2",
                 "--batch-size", "4"]) == 0
    assert "2 Ray actor(s)" in capsys.readouterr().out
    got = _load(out)
    assert set(got) == {"probs", "id"}
    np.testing.assert_array_equal(got["id"], single_process["id"])  # every sample, in order
    np.testing.assert_allclose(got["probs"], single_process["probs"], rtol=1e-6, atol=0)


def test_parquet_in_and_out_through_ray_data(local_ray, artifact, samples, single_process, tmp_path):
    ray = local_ray
    table = tmp_path / "predictions"
    assert main(["batch", str(artifact), "--input", str(samples), "--output", str(table) + ".parquet"]) == 0
    written = ray.data.read_parquet(str(table) + ".parquet").take_all()
    by_id = {int(r["id"]): r["probs"] for r in written}
    assert sorted(by_id) == list(single_process["id"])
    for i, probs in zip(single_process["id"], single_process["probs"]):
        np.testing.assert_allclose(by_id[int(i)], probs, rtol=1e-6, atol=0)
    # and Parquet in: the samples written by Ray Data, back out as npz
    src = tmp_path / "samples.parquet"
    ray.data.from_items([{"input": x, "id": int(i)} for x, i in zip(_load(samples)["input"], _load(samples)["id"])]
                        ).write_parquet(str(src))
    out = tmp_path / "from_parquet.npz"
    assert main(["batch", str(artifact), "--input", str(src), "--output", str(out), "--ray", "auto"]) == 0
    got = _load(out)
    order = np.argsort(got["id"])
    np.testing.assert_array_equal(got["id"][order], single_process["id"])
    np.testing.assert_allclose(got["probs"][order], single_process["probs"], rtol=1e-6, atol=0)


def test_the_callable_class_in_ray_datas_own_map_batches(local_ray, artifact, samples, single_process):
    import kiln.ray

    ray = local_ray
    given = _load(samples)
    ds = ray.data.from_items([{"input": x, "id": int(i)} for x, i in zip(given["input"], given["id"])])
    out = ds.map_batches(kiln.ray.KilnPredictor, fn_constructor_args=(str(artifact),), concurrency=2, batch_size=5,
                         batch_format="numpy", num_cpus=1)
    rows = sorted(out.take_all(), key=lambda r: r["id"])
    np.testing.assert_allclose(np.stack([r["probs"] for r in rows]), single_process["probs"], rtol=1e-6, atol=0)


def test_a_single_npy_array_is_refused_in_one_line_by_batch_and_check(artifact, tmp_path, capsys):
    """np.load gives a plain array for .npy data (here under an .npz name): both refuse it, exit 2."""
    npy = tmp_path / "samples.npz"
    with npy.open("wb") as f:
        np.save(f, np.zeros((2, 3, 64, 64), np.float32))
    assert main(["batch", str(artifact), "--input", str(npy), "--output", str(tmp_path / "o.npz")]) == 2
    assert main(["check", str(EXAMPLE), "--artifact", str(artifact), "--inputs", str(npy)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kiln: error: ")]
    assert len(lines) == 2 and all("a single .npy array, not an .npz archive" in ln for ln in lines)
