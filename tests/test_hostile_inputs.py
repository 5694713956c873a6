"""Regression tests for the reader/writer bugs the bad-input corpus and the fuzzer found."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import ModelReadError, Options, Prune, Quantize, Recipe, compress, decompress
from modelpress.core.quantize.stage import quantize_array
from modelpress.formats import open_model
from modelpress.formats.onnx.meta import decode_doc, encode_doc

from conftest import run_cli, sha256, write_safetensors
from corpus import good_onnx, onnx_model, save_onnx, st_raw, weights

F32_4x4 = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}


# -- safetensors: the data must be tiled exactly by the tensors -----------------


def test_safetensors_gap_between_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gap.safetensors"
    path.write_bytes(st_raw({"a": F32_4x4, "b": {"dtype": "F32", "shape": [4, 4],
                                                 "data_offsets": [96, 160]}}, bytes(160)))
    with pytest.raises(ModelReadError, match=r"32 bytes before tensor 'b' belong to no tensor"):
        open_model(path)


def test_safetensors_trailing_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tail.safetensors"
    path.write_bytes(st_raw({"w": F32_4x4}, bytes(64 + 8)))
    with pytest.raises(ModelReadError, match=r"8 bytes after the last tensor"):
        open_model(path)


def test_safetensors_first_tensor_must_start_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "offset.safetensors"
    path.write_bytes(st_raw({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [8, 72]}},
                            bytes(72)))
    with pytest.raises(ModelReadError, match=r"8 bytes before tensor 'w'"):
        open_model(path)


def test_safetensors_zero_size_tensors_share_an_offset(tmp_path: Path) -> None:
    header = {"e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
              "w": F32_4x4, "z": {"dtype": "I64", "shape": [10**8, 0], "data_offsets": [64, 64]}}
    path = tmp_path / "zero.safetensors"
    path.write_bytes(st_raw(header, bytes(64)))
    store = open_model(path)
    assert store.read("z").shape == (10**8, 0)


# -- scalars keep their shape --------------------------------------------------


@pytest.mark.parametrize("granularity, group", [("group", 16), ("channel", None), ("tensor", None)])
def test_quantize_a_scalar_is_per_tensor(granularity: str, group: int | None) -> None:
    q = quantize_array(np.array(-2.5, np.float32), bits=4, symmetric=True, granularity=granularity,
                       channel_axis=None, block_axis=0, group_size=group, method="rtn",
                       scale_dtype=np.dtype(np.float32))
    assert q.granularity == "tensor" and q.shape == ()
    assert float(q.decode()) == pytest.approx(-2.5, abs=float(q.scale.reshape(())) / 2)


@pytest.mark.parametrize("stage", [Quantize(bits=8, include=("*",), take_all_named=True),
                                   Quantize(bits=4, group_size=16, include=("*",),
                                            take_all_named=True),
                                   Prune(sparsity=0.5, include=("*",), take_all_named=True)])
def test_scalar_and_vector_keep_their_shape_in_safetensors(tmp_path: Path, stage) -> None:
    src = write_safetensors(tmp_path / "s.safetensors",
                            {"scale": np.array(0.5, np.float32), "bias": weights(64)})
    compress(src, tmp_path / "o.safetensors", Recipe([stage]), Options(min_elements=1))
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    dense = open_model(tmp_path / "d.safetensors")
    assert dense.tensors["scale"].shape == () and dense.tensors["bias"].shape == (64,)
    assert dense.read("scale").shape == ()


@pytest.mark.parametrize("stage", [Quantize(bits=8, include=("s",), take_all_named=True),
                                   Prune(sparsity=0.5, include=("s",), take_all_named=True)])
def test_scalar_initializer_keeps_its_shape_in_onnx(tmp_path: Path, stage) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])]
    model = onnx_model([numpy_helper.from_array(weights(64, 64), "w1"),
                        numpy_helper.from_array(np.array(2.0, np.float32), "s")], nodes)
    src = save_onnx(tmp_path / "m.onnx", model)
    compress(src, tmp_path / "o.onnx", Recipe([stage]), Options(min_elements=1))
    decompress(tmp_path / "o.onnx", tmp_path / "d.onnx")
    assert open_model(tmp_path / "d.onnx").read("s").shape == ()


# -- ONNX tensors are checked when the model is opened -------------------------


def _with_w1(tmp_path: Path, tensor: TensorProto) -> Path:
    model = onnx_model([tensor, numpy_helper.from_array(weights(64, 64), "w2")])
    return save_onnx(tmp_path / "m.onnx", model)


@pytest.mark.parametrize("tensor, message", [
    (TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[64, 64], raw_data=bytes(100)),
     r"tensor 'w1': raw_data holds 100 bytes but its dims \[64, 64\] need 16384"),
    (TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[-1, 4], raw_data=bytes(16)),
     r"tensor 'w1' has negative dims"),
    (TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[2**62, 8], raw_data=bytes(16)),
     r"tensor 'w1' has dims .* too large"),
    (TensorProto(name="w1", data_type=99, dims=[4], raw_data=bytes(16)),
     r"tensor 'w1' has an invalid data type \(99\)"),
    (TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[4, 4], float_data=[1.0, 2.0]),
     r"tensor 'w1' is corrupt"),
])
def test_corrupt_onnx_tensor_is_refused_at_open(tmp_path: Path, tensor, message) -> None:
    path = _with_w1(tmp_path, tensor)
    with pytest.raises(ModelReadError, match=message):
        open_model(path)


def test_onnx_int4_raw_data_is_two_per_byte(tmp_path: Path) -> None:
    codes = helper.make_tensor("w1", TensorProto.INT4, [3, 3], bytes(5), raw=True)
    assert open_model(_with_w1(tmp_path, codes)).tensors["w1"].shape == (3, 3)


def test_invalid_input_model_is_named_not_the_output(tmp_path: Path) -> None:
    model = good_onnx()
    del model.graph.initializer[0]  # MatMul now reads an undefined 'w1'
    src = save_onnx(tmp_path / "m.onnx", model)
    for stages in (["quantize", "--bits", "8"], ["quantize", "--bits", "4"]):
        result = run_cli(["compress", src, "-o", tmp_path / "o.onnx", *stages])
        assert result.exit_code == 1
        line = result.stderr.strip()
        assert line.startswith(f"Error: {src}: the model fails onnx.checker")
        assert "'w1'" in line and "\n" not in line
    result = run_cli(["decompress", src, "-o", tmp_path / "o.onnx"])
    assert result.exit_code == 1 and f"{src}: the model fails onnx.checker" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_negative_external_offset_is_named(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(bytes(64 * 64 * 4))
    tensor = TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[64, 64],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "-8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    with pytest.raises(ModelReadError, match=r"tensor 'w1': external data offset -8 .* negative"):
        open_model(_with_w1(tmp_path, tensor))


# -- damaged modelpress metadata ----------------------------------------------


def _compressed_onnx(tmp_path: Path, samples: Path, edit) -> Path:
    out = tmp_path / "c.onnx"
    compress(samples / "mlp.onnx", out, Recipe([Quantize(bits=4)]))
    model = onnx.load(str(out))
    meta = decode_doc(model.metadata_props[0].value)
    edit(meta["tensors"]["fc1.weight"])
    model.metadata_props[0].value = encode_doc(meta)
    return save_onnx(out, model)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["initializers"].update(codes="nope"), r"tensor 'fc1.weight' lacks \['nope'\]"),
    (lambda s: s.update(dtype=12345), r"corrupt modelpress metadata"),
    (lambda s: s.update(shape=[-1, 3]), r"invalid shape"),
    (lambda s: s.update(layout=7), r"no layout"),
    (lambda s: s.update(initializers=["a", "b"]), r"lacks"),
])
def test_onnx_metadata_naming_missing_parts_is_refused(tmp_path: Path, samples: Path, edit,
                                                        message) -> None:
    with pytest.raises(ModelReadError, match=message):
        open_model(_compressed_onnx(tmp_path, samples, edit))


BROKEN = "corrupt modelpress encoding"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(shape=[1000, 1000]), BROKEN), (lambda s: s.update(granularity=7), BROKEN),
    (lambda s: s.update(bits="four"), BROKEN),
    (lambda s: s.update(layout="mystery"), "unknown modelpress ONNX layout 'mystery'")])
def test_onnx_metadata_that_does_not_decode_is_one_line(tmp_path: Path, samples: Path,
                                                        edit, message: str) -> None:
    path = _compressed_onnx(tmp_path, samples, edit)
    before = sha256(path)
    for args in (["inspect", path], ["decompress", path, "-o", tmp_path / "d.onnx"]):
        result = run_cli(args)
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit)
        assert f"{path}: tensor 'fc1.weight': {message}" in result.stderr
    assert sha256(path) == before and not (tmp_path / "d.onnx").exists()


def test_safetensors_header_length_field_is_little_endian_u64(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63 + 5) + b"{}")
    with pytest.raises(ModelReadError, match="header length"):
        open_model(path)


# -- names from files are shown as text, never interpreted -----------------------


@pytest.mark.parametrize("command", ["inspect", "compress", "compress-markdown"])
def test_tensor_names_with_rich_markup_are_printed_verbatim(tmp_path: Path, command: str) -> None:
    names = ["[/bad]", "[bold red]loud", "a|b`c.weight", "esc\x1b[2Jape"]
    src = write_safetensors(tmp_path / "m.safetensors", {n: weights(64, 64, seed=i)
                                                         for i, n in enumerate(names)})
    if command == "inspect":
        result = run_cli(["inspect", src])
    else:
        fmt = ["--format", "markdown"] if command.endswith("markdown") else []
        result = run_cli(["compress", src, "-o", tmp_path / "o.safetensors", *fmt, "quantize"])
    assert result.exit_code == 0, repr(result.exception)
    assert "[/bad]" in result.stdout and "[bold red]loud" in result.stdout
    assert "\x1b" not in result.stdout  # control characters are not passed to the terminal
    assert "esc\\x1b[2Jape" in result.stdout
    if command.endswith("markdown"):
        assert "`a\\|b'c.weight`" in result.stdout


# -- found by the fuzzer (tests/fuzz/fuzz_readers.py) ---------------------------


def test_safetensors_dtype_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_raw({"w": {"dtype": ["F32"], "shape": [4, 4], "data_offsets": [0, 64]}},
                            bytes(64)))
    with pytest.raises(ModelReadError, match=r"tensor 'w' has unsupported dtype \['F32'\]"):
        open_model(path)


def _external_codes(tmp_path: Path, samples: Path, location: str) -> Path:
    """A modelpress int4 ONNX whose codes initializer was moved to external data."""
    folder = tmp_path / "model"
    folder.mkdir()
    out = folder / "c.onnx"
    compress(samples / "mlp.onnx", out, Recipe([Quantize(bits=4, group_size=32)]))
    model = onnx.load(str(out))
    codes = next(t for t in model.graph.initializer if t.name == "fc1.weight_quantized")
    (folder / "codes.bin").write_bytes(codes.raw_data)
    codes.ClearField("raw_data")
    codes.data_location = TensorProto.EXTERNAL
    entry = codes.external_data.add()
    entry.key, entry.value = "location", location
    return save_onnx(out, model)


def test_external_modelpress_parts_are_read_through_the_location_checks(
        tmp_path: Path, samples: Path, monkeypatch) -> None:
    reference = tmp_path / "ref.onnx"
    compress(samples / "mlp.onnx", reference, Recipe([Quantize(bits=4, group_size=32)]))
    path = _external_codes(tmp_path, samples, "codes.bin")
    monkeypatch.chdir(tmp_path)  # onnx's own helpers would look for codes.bin here
    got = open_model(path).decode("fc1.weight").decode()
    assert np.array_equal(got, open_model(reference).decode("fc1.weight").decode())
    decompress(path, tmp_path / "d.onnx")
    from modelpress import inspect  # counts stored bytes from the header, reads nothing
    rows = {r.name: r for r in inspect(path).rows}
    assert rows["fc1.weight"].stored_bytes == {r.name: r for r in inspect(reference).rows}[
        "fc1.weight"].stored_bytes


def test_external_modelpress_part_outside_the_model_folder_is_refused(
        tmp_path: Path, samples: Path, monkeypatch) -> None:
    path = _external_codes(tmp_path, samples, "stolen.bin")
    (path.parent / "codes.bin").rename(tmp_path / "stolen.bin")
    monkeypatch.chdir(tmp_path)  # the file exists in the current folder, not beside the model
    result = run_cli(["decompress", path, "-o", tmp_path / "d.onnx"])
    assert result.exit_code == 1
    assert "tensor 'fc1.weight_quantized': external data file 'stolen.bin' is missing" in result.stderr
    assert not (tmp_path / "d.onnx").exists()


@pytest.mark.parametrize("args", [["inspect"], ["compress", "--min-elements", "1", "quantize"],
                                  ["compress", "quantize", "--exclude", "x*"], ["decompress"]])
def test_onnx_names_that_are_not_utf8_are_refused(tmp_path: Path, args: list[str]) -> None:
    # protobuf returns such names as bytes; they crashed fnmatch and the writer.
    src = tmp_path / "m.onnx"
    src.write_bytes(good_onnx().SerializeToString().replace(b"w1", b"\xf71"))
    out = ["-o", tmp_path / "o.onnx"] if args[0] != "inspect" else []
    result = run_cli([args[0], src, *out, *args[1:]])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.strip() == (f"Error: {src}: not a valid ONNX model (the name b'\\xf71' "
                                     "is not UTF-8 text)")


@pytest.mark.filterwarnings("error")  # pytest would otherwise swallow the warning
def test_quantizing_weights_near_the_float32_limit_prints_no_warning(tmp_path: Path) -> None:
    w = np.full((64, 64), 3e38, np.float32)
    w[::2] = -3.3e38
    src = write_safetensors(tmp_path / "m.safetensors", {"fc.weight": w})
    for scheme in ("sym", "asym"):
        result = run_cli(["compress", src, "-o", tmp_path / f"{scheme}.safetensors", "quantize",
                          "--bits", "4", "--scheme", scheme])
        assert result.exit_code == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("location, message", [
    ("w\0.bin", r"external data location 'w\\x00.bin' is not a valid path"),
    (b"w\xff.bin", r"external data location b'w\\xff.bin' is not a valid path"),
    ("loop.bin", r"'loop.bin' is a loop of symbolic links"),
])
def test_external_locations_that_are_not_paths_are_refused(tmp_path: Path, location,
                                                           message: str) -> None:
    # Found by the fuzzer: a NUL byte (ValueError), non-UTF-8 bytes (TypeError).
    from corpus import external_model
    (tmp_path / "loop.bin").symlink_to(tmp_path / "loop.bin")
    raw = location if isinstance(location, bytes) else location.encode()
    path = external_model(tmp_path, "X" * len(raw), data=None)  # same length, so the
    path.write_bytes(path.read_bytes().replace(b"X" * len(raw), raw))  # protobuf stays valid
    with pytest.raises(ModelReadError, match=message):
        open_model(path)


# -- path traversal ------------------------------------------------------------------


@pytest.mark.parametrize("location, reason", [
    ("../../etc/passwd", "points outside the model's folder"),
    ("/etc/passwd", "is not a relative path inside the model's folder"),
    ("sub/../../outside.bin", "points outside the model's folder"),
])
def test_onnx_external_data_traversal_is_refused_by_every_command(tmp_path: Path, location: str,
                                                                   reason: str) -> None:
    from corpus import external_model
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(bytes(64 * 64 * 4))
    path = external_model(folder, location, data=None)
    expected = (f"Error: {path}: tensor 'w1': external data location {location!r} {reason}; "
                "refusing to read it")
    for args in (["inspect", path], ["decompress", path, "-o", tmp_path / "d.onnx"],
                 ["compress", path, "-o", tmp_path / "c.onnx", "quantize"]):
        result = run_cli(args)
        assert result.exit_code == 1 and result.stderr.strip() == expected, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "outside.bin"]


def test_batch_shard_index_traversal_is_refused(tmp_path: Path, samples: Path) -> None:
    """Issue 5's sharded checkpoints and batch mode: an index may not name a file outside."""
    pytest.importorskip("modelpress.formats.safetensors.sharded", reason="no sharded checkpoints yet (issue 5)")
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "secret.safetensors").write_bytes((samples / "mlp.safetensors").read_bytes())
    (models / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"fc1.weight": "../secret.safetensors"}}))
    out = tmp_path / "out"
    result = run_cli(["compress", models, "-o", out, "quantize", "--bits", "4"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "../secret.safetensors" in result.output and "Traceback" not in result.output
    written = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert sorted(p.name for p in written) == ["model.safetensors.index.json", "secret.safetensors"]
    assert not any(p.suffix == ".safetensors" for p in out.rglob("*"))


def test_pickled_inputs_and_labels_are_never_unpickled(tmp_path: Path) -> None:
    """Issue 4's --inputs/--labels files: np.load must run with allow_pickle=False."""
    onnx_run = pytest.importorskip("modelpress.formats.onnx.run", reason="no evaluation inputs yet (issue 4)")
    from modelpress import ModelpressError
    from corpus import Hostile
    marker = tmp_path / "PICKLE-WAS-LOADED"
    payload = np.array([Hostile(marker)], dtype=object)
    np.save(tmp_path / "labels.npy", payload, allow_pickle=True)
    np.savez(tmp_path / "inputs.npz", input=payload)
    model = onnx.load_from_string(good_onnx().SerializeToString())
    with pytest.raises(ModelpressError):
        onnx_run.load_labels(tmp_path / "labels.npy")
    with pytest.raises(ModelpressError):
        onnx_run.load_inputs(model, tmp_path / "inputs.npz")
    assert not marker.exists()


# -- very large dims, for real ---------------------------------------------------------


def test_a_real_1_by_10_to_the_8_tensor(tmp_path: Path) -> None:
    """A genuine [1, 10^8] tensor (int8, 100 MB; a sparse file, so creating it costs no disk
    writes) through inspect, compress (copied: not a float) and decompress. The corpus covers
    the same shape claimed by headers over short bodies; float [1, 10^8] quantization is in
    benchmarks/kill_during_write.py's size range rather than here, to keep the suite fast."""
    from modelpress.formats.safetensors.header import encode_header
    big = 10**8
    src = tmp_path / "big.safetensors"
    head = encode_header([("table", "I8", (1, big), big), ("fc.weight", "F32", (64, 64), 16384)],
                         {})
    with open(src, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + big)  # a hole of zeros
        fh.seek(len(head) + big)
        fh.write(weights(64, 64).tobytes())
    result = run_cli(["inspect", src, "--format", "json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)["tensors"]}
    assert rows["table"]["shape"] == [1, big] and rows["table"]["zero_fraction"] == 1.0
    out = tmp_path / "out.safetensors"
    assert run_cli(["compress", src, "-o", out, "quantize"]).exit_code == 0
    store = open_model(out)
    assert store.tensors["table"].shape == (1, big) and "fc.weight" in store.encodings
    assert run_cli(["decompress", out, "-o", tmp_path / "d.safetensors"]).exit_code == 0
    dense = open_model(tmp_path / "d.safetensors")
    assert dense.tensors["table"].shape == (1, big) and not dense.read("table").any()
    assert np.abs(dense.read("fc.weight") - weights(64, 64)).max() < 0.05


# -- NaN / Inf: refused by default, untouched with --allow-nonfinite ----------------


def test_nonfinite_weights_are_refused_or_left_exactly_as_they_are(tmp_path: Path) -> None:
    bad = weights(64, 64)
    bad[0, :3] = [np.nan, np.inf, -np.inf]
    src = write_safetensors(tmp_path / "m.safetensors", {"bad.weight": bad,
                                                         "good.weight": weights(64, 64, seed=1)})
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    result = run_cli(["compress", src, "-o", out, "quantize"])
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.strip() == (
        f"Error: {src}: tensor 'bad.weight' has 3 NaN/Inf values; fix the model, exclude it "
        "(--exclude 'bad.weight'), or pass --allow-nonfinite to leave such tensors as they are")
    result = run_cli(["compress", src, "-o", out, "--allow-nonfinite", "--report", report,
                      "quantize"])
    assert result.exit_code == 0
    doc = json.loads(report.read_text())
    assert [t["name"] for t in doc["tensors"]] == ["good.weight"]
    assert "bad.weight: left as is (3 NaN/Inf values, --allow-nonfinite)" in doc["notes"]
    assert open_model(out).read("bad.weight").tobytes() == bad.tobytes()


# -- found by the corpus once issues 3 and 4 were merged --------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_a_clustered_scalar_keeps_its_shape(tmp_path: Path, suffix: str) -> None:
    from modelpress import REGISTRY
    cluster = REGISTRY["cluster"](include=("s",), take_all_named=True)
    if suffix == ".onnx":
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
                 helper.make_node("Mul", ["h", "s"], ["y"])]
        src = save_onnx(tmp_path / "m.onnx", onnx_model(
            [numpy_helper.from_array(weights(64, 64), "w1"),
             numpy_helper.from_array(np.array(2.0, np.float32), "s")], nodes))
    else:
        src = write_safetensors(tmp_path / "m.safetensors", {"s": np.array(2.0, np.float32)})
    out = tmp_path / f"o{suffix}"
    compress(src, out, Recipe([cluster]), Options(min_elements=1))
    assert open_model(out).decode("s").decode().shape == ()
    decompress(out, tmp_path / f"d{suffix}")
    assert open_model(tmp_path / f"d{suffix}").read("s").shape == ()


def test_a_model_random_inputs_cannot_feed_still_compresses(tmp_path: Path) -> None:
    """A bf16 ONNX input: output error is not measured (a note), compress succeeds."""
    import ml_dtypes
    src = save_onnx(tmp_path / "m.onnx", good_onnx(ml_dtypes.bfloat16))
    result = run_cli(["compress", src, "-o", tmp_path / "o.onnx", "quantize", "--bits", "8"])
    assert result.exit_code == 0, result.output
    assert "output error not measured: input 'x' has dtype bfloat16" in result.stdout


@pytest.mark.filterwarnings("error")
def test_error_metrics_of_non_finite_values_warn_nothing() -> None:
    from modelpress import compare
    stats = compare(np.array([1.0, np.inf]), np.array([1.0, np.inf]))
    assert stats.as_dict()["rel_error"] is None


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("dtype, pattern", [(np.float64, 0x7FF4000000000000),
                                            (np.float32, 0x7FA00000)])
def test_signalling_nans_are_refused_quietly(tmp_path: Path, dtype, pattern: int) -> None:
    w = weights(64, 64).astype(dtype)
    w.reshape(-1)[:5] = np.array([pattern] * 5, dtype=w.dtype.str.replace("f", "u")).view(dtype)
    src = write_safetensors(tmp_path / "m.safetensors", {"w.weight": w})
    assert run_cli(["inspect", src]).exit_code == 0
    result = run_cli(["compress", src, "-o", tmp_path / "o.safetensors", "quantize"])
    assert result.exit_code == 1 and "tensor 'w.weight' has 5 NaN/Inf values" in result.stderr


@pytest.mark.filterwarnings("error")
def test_float64_beyond_float32_range_is_refused_not_called_infinite(tmp_path: Path) -> None:
    w = weights(64, 64).astype(np.float64)
    w[0, 0] = -1e300
    src = write_safetensors(tmp_path / "m.safetensors", {"w.weight": w})
    result = run_cli(["compress", src, "-o", tmp_path / "o.safetensors", "quantize"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.strip() == (
        f"Error: {src}: tensor 'w.weight' holds values beyond float32's range (up to 1e+300); "
        "stages compute in float32, so exclude it (--exclude 'w.weight')")


@pytest.mark.parametrize("stages", [["lowrank", "--rank-ratio", "0.25"], ["quantize"]])
def test_an_invalid_input_is_refused_even_when_a_rewrite_would_drop_the_bad_node(
        tmp_path: Path, stages: list[str]) -> None:
    """Found by the fuzzer: a Gemm with an unknown attribute compressed fine through lowrank
    (which replaces the Gemm) into an output that could not be decompressed."""
    model = onnx_model([numpy_helper.from_array(weights(64, 64), "w1"),
                        numpy_helper.from_array(weights(64, 64, seed=2), "w2")],
                       [helper.make_node("MatMul", ["x", "w1"], ["h"]),
                        helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1, axis=1)])
    src = save_onnx(tmp_path / "m.onnx", model)
    result = run_cli(["compress", src, "-o", tmp_path / "o.onnx", "--min-elements", "1", *stages])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: {src}: the model fails onnx.checker (Unrecognized "
                                    "attribute: axis for operator Gemm")
    assert not (tmp_path / "o.onnx").exists()


def test_metadata_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """Fuzzer finding: such a value crashed the rewrite of metadata_props on save."""
    model = good_onnx()
    helper.set_model_props(model, {"note": "XXXX"})
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString().replace(b"XXXX", b"\xff\xfe\xfd\xfc"))
    for args in (["inspect", src], ["decompress", src, "-o", tmp_path / "d.onnx"]):
        result = run_cli(args)
        assert result.exit_code == 1 and "is not UTF-8 text" in result.stderr, result.output


@pytest.mark.parametrize("nodes", [[["x"]], "abc", [3]])
def test_metadata_node_lists_must_hold_names(tmp_path: Path, samples: Path, nodes) -> None:
    """Fuzzer finding: a nested list crashed decompress with TypeError (unhashable)."""
    with pytest.raises(ModelReadError, match=r"tensor 'fc1.weight' lacks its node list"):
        open_model(_compressed_onnx(tmp_path, samples, lambda s: s.update(nodes=nodes)))
