"""Streaming compression: bounded tensors in flight, --threads, ONNX external data, fast start."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from modelpress import Quantize, Recipe
from modelpress.app.api import compress, decompress
from modelpress.core.errors import ModelWriteError
from modelpress.core.pipeline import Options, encode_stream
from modelpress.formats.onnx.options import OnnxWriteOptions
from conftest import matmul_model, ort_run, rng_weights, run_cli, sha256, write_safetensors
from modelpress.formats import open_model

ROOT = Path(__file__).resolve().parent.parent


# -- bounded work in flight -----------------------------------------------------


class _CountingStore:
    """A safetensors store that records how many tensors were read before each yield."""

    def __init__(self, store) -> None:
        self._store = store
        self.reads = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read(self, name: str) -> np.ndarray:
        with self._lock:
            self.reads += 1
        return self._store.read(name)


def _ahead(store: _CountingStore, threads: int) -> tuple[list[str], list[int]]:
    """Names yielded, and how many tensors had been read beyond each one when it came."""
    names, ahead = [], []
    for name, _ in encode_stream(store, Recipe([Quantize()]), Options(threads=threads)):
        names.append(name)
        ahead.append(store.reads - len(names))
    return names, ahead


@pytest.mark.parametrize("threads", [1, 3])
def test_encode_stream_reads_at_most_threads_tensors_ahead(tmp_path: Path, threads: int,
                                                           monkeypatch) -> None:
    # One large tensor first, then small ones: several small ones fit the byte budget.
    import modelpress.core.pipeline as pipeline
    monkeypatch.setattr(pipeline, "IN_FLIGHT_FLOOR", 0)
    tensors = {"a_big": rng_weights(256, 128, seed=99)}
    tensors.update({f"w{i:02d}": rng_weights(64, 64, seed=i) for i in range(12)})
    store = _CountingStore(open_model(write_safetensors(tmp_path / "m.safetensors", tensors)))
    names, ahead = _ahead(store, threads)
    assert names == sorted(tensors)
    assert max(ahead) <= threads - 1 and min(ahead) >= 0
    if threads > 1:
        assert max(ahead) >= 1  # the pool really works ahead of the consumer


def test_tensors_in_flight_stay_within_the_largest_tensor(tmp_path: Path, monkeypatch) -> None:
    import modelpress.core.pipeline as pipeline
    monkeypatch.setattr(pipeline, "IN_FLIGHT_FLOOR", 0)  # as if these were large tensors
    # Equal tensors: only one fits the budget at a time, whatever the thread count.
    tensors = {f"w{i:02d}": rng_weights(64, 64, seed=i) for i in range(6)}
    store = _CountingStore(open_model(write_safetensors(tmp_path / "m.safetensors", tensors)))
    names, ahead = _ahead(store, 3)
    assert names == sorted(tensors) and ahead == [0] * 6


# -- output bytes do not depend on --threads ------------------------------------


@pytest.mark.parametrize("model,stage", [
    ("transformer.safetensors", ["quantize", "--bits", "4", "--group-size", "32"]),
    ("transformer.onnx", ["quantize", "--bits", "4", "--group-size", "32"]),
    ("transformer.onnx", ["prune", "--sparsity", "0.5", "quantize", "--bits", "8"]),
])
def test_threads_do_not_change_the_output(tmp_path: Path, samples: Path, model: str,
                                          stage: list[str]) -> None:
    outputs = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}{Path(model).suffix}"
        extra = ["--no-eval"] if model.endswith(".onnx") else []
        result = run_cli(["compress", samples / model, "-o", out, "--threads", threads, "-q",
                          *extra, *stage])
        assert result.exit_code == 0, result.output
        outputs.append(sha256(out))
    assert outputs[0] == outputs[1]


def test_threads_must_be_positive(samples: Path, tmp_path: Path) -> None:
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx",
                      "--threads", "0", "quantize"])
    assert result.exit_code == 2 and not (tmp_path / "o.onnx").exists()


# -- ONNX external data -----------------------------------------------------------


def _feeds(in_features: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((3, in_features)).astype(np.float32)}


def test_external_data_always_writes_a_data_file_that_runs_like_inline(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "src.onnx", {"w1": rng_weights(256, 128, seed=1),
                                                "w2": rng_weights(128, 64, seed=2)})
    recipe = Recipe([Quantize(bits=4, group_size=32)])
    compress(src, tmp_path / "inline.onnx", recipe)
    compress(src, tmp_path / "ext.onnx", recipe,
             onnx_options=OnnxWriteOptions(external_data="always"))
    assert not (tmp_path / "inline.onnx.data").exists()
    data = tmp_path / "ext.onnx.data"
    model = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e.value == "ext.onnx.data" for t in external
                            for e in t.external_data if e.key == "location")
    assert data.stat().st_size > (tmp_path / "ext.onnx").stat().st_size
    assert [t.name for t in model.graph.initializer] == [
        t.name for t in onnx.load(str(tmp_path / "inline.onnx")).graph.initializer]
    feeds = _feeds(256)
    np.testing.assert_array_equal(ort_run(tmp_path / "ext.onnx", feeds, exact=True)[0],
                                  ort_run(tmp_path / "inline.onnx", feeds, exact=True)[0])
    # Read back through modelpress: same encodings, and decompress keeps external data.
    assert open_model(tmp_path / "ext.onnx").encodings.keys() == {"w1", "w2"}
    decompress(tmp_path / "ext.onnx", tmp_path / "dense.onnx")
    dense = open_model(tmp_path / "dense.onnx")
    assert not dense.encodings
    assert dense.read("w1").shape == (256, 128)


def test_external_input_untouched_tensors_are_copied_into_the_output_data(tmp_path: Path) -> None:
    w1, small = rng_weights(256, 128, seed=1), rng_weights(128, 8, seed=2)
    model = onnx.load(str(matmul_model(tmp_path / "src.onnx", {"w1": w1, "small": small})))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    # "small" has 1024 elements, under --min-elements: it stays dense and is copied.
    compress(tmp_path / "m.onnx", tmp_path / "o.onnx", Recipe([Quantize()]),
             onnx_options=OnnxWriteOptions(external_data="always"))
    out = open_model(tmp_path / "o.onnx")
    assert out.data_files == {tmp_path / "o.onnx.data"}
    np.testing.assert_array_equal(out.read("small"), small)
    feeds = _feeds(256)
    reference = ort_run(tmp_path / "m.onnx", feeds)[0]
    got = ort_run(tmp_path / "o.onnx", feeds)[0]
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.02


def test_external_data_never_and_auto_on_a_small_input_write_one_file(tmp_path: Path) -> None:
    model = onnx.load(str(matmul_model(tmp_path / "src.onnx", {"w": rng_weights(128, 64)})))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    for mode in ("auto", "never"):
        out = tmp_path / f"{mode}.onnx"
        compress(tmp_path / "m.onnx", out, Recipe([Quantize()]),
                 onnx_options=OnnxWriteOptions(external_data=mode))
        assert not open_model(out).data_files and not Path(f"{out}.data").exists()


def test_an_output_over_the_protobuf_limit_goes_to_external_data(tmp_path: Path,
                                                                 monkeypatch) -> None:
    import modelpress.formats.onnx.write as onnx_write
    monkeypatch.setattr(onnx_write, "PROTOBUF_LIMIT", 20_000)  # stands in for 2 GB
    src = matmul_model(tmp_path / "src.onnx", {"w": rng_weights(256, 128)})
    compress(src, tmp_path / "auto.onnx", Recipe([Quantize()]))
    assert open_model(tmp_path / "auto.onnx").data_files == {tmp_path / "auto.onnx.data"}
    with pytest.raises(ModelWriteError, match="over 2 GB, protobuf's limit"):
        compress(src, tmp_path / "never.onnx", Recipe([Quantize()]),
                 onnx_options=OnnxWriteOptions(external_data="never"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx", "auto.onnx.data",
                                                          "src.onnx"]


def test_external_data_option_on_the_command_line(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "src.onnx", {"w": rng_weights(128, 64)})
    result = run_cli(["compress", src, "-o", tmp_path / "o.onnx", "--external-data", "always",
                      "quantize"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o.onnx.data").is_file()


def test_an_output_whose_data_file_is_an_input_file_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(matmul_model(tmp_path / "src.onnx", {"w": rng_weights(128, 64)})))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="o.onnx.data", size_threshold=0)
    before = sha256(tmp_path / "o.onnx.data")
    result = run_cli(["compress", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx",
                      "--external-data", "always", "quantize"])
    assert result.exit_code == 1
    assert "data file o.onnx.data would replace o.onnx.data, a file of the input" in result.output
    assert sha256(tmp_path / "o.onnx.data") == before and not (tmp_path / "o.onnx").exists()


# -- fast start ---------------------------------------------------------------------

_PROBE = """
import sys
from modelpress.cli.entry import cli
try:
    cli.main(sys.argv[1:], prog_name="modelpress", standalone_mode=False)
except SystemExit:
    pass
heavy = sorted(m for m in ("onnxruntime", "scipy", "torch") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize("args", [["--help"], ["compress", "--help"],
                                  ["inspect", "sample_models/mlp.onnx"],
                                  ["inspect", "sample_models/mlp.safetensors"]])
def test_help_and_inspect_do_not_import_onnxruntime(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY:"


def test_threads_do_not_change_the_batch_recipe_fingerprint() -> None:
    from modelpress.app.batch.plan import recipe_sha256
    recipe = Recipe([Quantize(bits=4)])
    assert recipe_sha256(recipe, Options(threads=1)) == recipe_sha256(recipe, Options(threads=3))
    always = OnnxWriteOptions(external_data="always")
    assert recipe_sha256(recipe, Options()) != recipe_sha256(recipe, Options(), always)
