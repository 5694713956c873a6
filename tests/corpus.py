"""A corpus of bad, odd and hostile model files, built on the fly (nothing binary is committed).

`build_corpus(root)` writes every entry into its own folder under `root` (so
external data files sit beside their model) and returns the entries. Each
entry says what must happen when the CLI meets it:

- `read_error`: no command can read it; every command fails with one line
  naming the file and containing this text.
- `compress_error`: readable (inspect and decompress succeed) but compress
  refuses with one line containing this text, for every recipe (a dict maps
  recipe names to texts when recipes differ).
- `write_error`: inspect succeeds, but compress and decompress refuse to write
  (an input that is not a valid model) with one line containing this text.
- `decode_error`: a damaged modelpress-compressed file: inspect and decompress
  fail with this text (compress refuses it as already compressed).
- none of these: every command succeeds.

Very large dims (1 x 10^8) are covered without 400 MB files: headers and
ONNX tensors that claim such shapes over short bodies (the error path), and a
real zero-element [10^8, 0] tensor. A real 10^8-element tensor read from a
sparse file is a separate, opt-in case (`large_real_safetensors`).
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
BIG = 10**8


@dataclass
class Entry:
    """One corpus file and what the CLI must do with it."""

    name: str
    path: Path
    read_error: str | None = None
    compress_error: str | dict[str, str] | None = None
    write_error: str | None = None
    decode_error: str | None = None
    stage_args: tuple[str, ...] = ()  # added after every stage (e.g. --include)
    group_args: tuple[str, ...] = ()  # compress options (e.g. --allow-nonfinite)
    untouched: tuple[str, ...] = ()  # tensors a successful compress must leave bit-identical

    def expected_error(self, command: str, recipe: str = "") -> str | None:
        """The text the one error line must contain, or None if `command` must succeed."""
        if self.read_error is not None:
            return self.read_error
        if command == "compress":
            if isinstance(self.compress_error, dict):
                return self.compress_error.get(recipe, self.write_error)
            return self.compress_error if self.compress_error is not None else self.write_error
        if command == "inspect":
            return self.decode_error
        return self.decode_error if self.decode_error is not None else self.write_error


# -- raw builders --------------------------------------------------------------


def st_raw(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """safetensors bytes from a header (dict or raw JSON bytes) and data; `length` overrides."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def st_file(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path))
    return path


def weights(*shape: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def onnx_model(inits: list[TensorProto], nodes: list[onnx.NodeProto] | None = None,
               opset: int = 17, inputs: list | None = None, outputs: list | None = None,
               elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> MatMul(w1) -> MatMul(w2) -> y unless nodes are given; no checker (bad models too)."""
    if nodes is None:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
                 helper.make_node("MatMul", ["h", "w2"], ["y"])]
    inputs = inputs or [helper.make_tensor_value_info("x", elem, ["batch", 64])]
    outputs = outputs or [helper.make_tensor_value_info("y", elem, ["batch", 64])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def save_onnx(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def good_onnx(dtype=np.float32, w1=None) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w1 = weights(64, 64, seed=1, dtype=dtype) if w1 is None else w1
    return onnx_model([numpy_helper.from_array(w1, "w1"),
                       numpy_helper.from_array(weights(64, 64, seed=2, dtype=dtype), "w2")],
                      elem=elem)


def external(name: str, dims: list[int], location: str, **extra: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims,
                         data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, **{k: str(v) for k, v in extra.items()}}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def external_model(folder: Path, location: str, data: bytes | None = b"", dims=(64, 64),
                   **extra: int) -> Path:
    """w1 stored as external data at `location` (data written to folder/location if given)."""
    if data is not None and not location.startswith("/") and ".." not in location:
        (folder / location).write_bytes(data)
    model = onnx_model([external("w1", list(dims), location, **extra),
                        numpy_helper.from_array(weights(64, 64, seed=2), "w2")])
    return save_onnx(folder / "model.onnx", model)


class Hostile:
    """Unpickling this creates a marker file: proof that a pickle was (never) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def marker_path(root: Path) -> Path:
    """Where a loaded pickle from the corpus would leave its mark."""
    return root / "PICKLE-WAS-LOADED"


# -- the corpus ----------------------------------------------------------------

Builder = Callable[[Path], "Entry"]
_BUILDERS: list[tuple[str, Callable[[Path], dict]]] = []


def entry(name: str) -> Callable:
    def wrap(fn: Callable[[Path], dict]) -> Callable[[Path], dict]:
        _BUILDERS.append((name, fn))
        return fn
    return wrap


def _truncations(fmt: str, sample: str) -> None:
    size = (SAMPLES / sample).stat().st_size
    header_end = None
    if fmt == "safetensors":
        header_end = 8 + struct.unpack("<Q", (SAMPLES / sample).read_bytes()[:8])[0]
    cuts = [4, 8, 100, size // 2, size - 1] if fmt == "safetensors" else [1, 16, 1000, size // 2,
                                                                           size - 1]
    if header_end is not None:
        cuts.append(header_end)
    for cut in cuts:
        def build(d: Path, cut: int = cut) -> dict:
            p = d / f"model.{fmt}"
            p.write_bytes((SAMPLES / sample).read_bytes()[:cut])
            return {"path": p, "read_error": ""}
        entry(f"truncated-{fmt}-at-{cut}")(build)


_truncations("safetensors", "mlp.safetensors")
_truncations("onnx", "mlp.onnx")


@entry("empty-onnx")
def _(d):
    (d / "model.onnx").write_bytes(b"")
    return {"path": d / "model.onnx", "read_error": "file is empty"}


@entry("empty-safetensors")
def _(d):
    (d / "model.safetensors").write_bytes(b"")
    return {"path": d / "model.safetensors", "read_error": "file is empty"}


@entry("random-bytes-onnx")
def _(d):
    (d / "model.onnx").write_bytes(np.random.default_rng(7).bytes(4096))
    return {"path": d / "model.onnx", "read_error": "not a valid ONNX model"}


@entry("random-bytes-safetensors")
def _(d):
    (d / "model.safetensors").write_bytes(np.random.default_rng(8).bytes(4096))
    return {"path": d / "model.safetensors", "read_error": "safetensors"}


@entry("pickle-named-safetensors")
def _(d):
    (d / "model.safetensors").write_bytes(pickle.dumps(Hostile(marker_path(d.parent))))
    return {"path": d / "model.safetensors", "read_error": "safetensors"}


@entry("pickle-named-onnx")
def _(d):
    (d / "model.onnx").write_bytes(pickle.dumps(Hostile(marker_path(d.parent))))
    return {"path": d / "model.onnx", "read_error": "ONNX"}


# safetensors headers


def _st_header_entry(name: str, header, data: bytes = b"", length: int | None = None,
                     error: str = "") -> None:
    def build(d: Path) -> dict:
        p = d / "model.safetensors"
        p.write_bytes(st_raw(header, data, length))
        return {"path": p, "read_error": error}
    entry(name)(build)


_W = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
_st_header_entry("st-length-exceeds-file", {"w": _W}, bytes(64), length=10_000, error="header length")
_st_header_entry("st-multi-gigabyte-header-length", {"w": _W}, bytes(64), length=5 << 30,
                 error="header length")
_st_header_entry("st-malformed-json", b'{"w": {"dtype": "F32", "shape": [4, 4', bytes(64),
                 error="not valid JSON")
_st_header_entry("st-not-utf8", b'{"w\xff\xfe": 1}', error="not valid JSON")
_st_header_entry("st-header-is-a-list", b"[1, 2, 3]", error="not a JSON object")
_st_header_entry("st-overlapping-offsets",
                 {"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                  "b": {"dtype": "F32", "shape": [4, 4], "data_offsets": [32, 96]}}, bytes(96),
                 error="overlap")
_st_header_entry("st-offsets-past-end", {"w": {"dtype": "F32", "shape": [4, 4],
                                               "data_offsets": [0, 64]}}, bytes(32),
                 error="truncated")
_st_header_entry("st-unknown-dtype", {"w": {"dtype": "Q4_K", "shape": [4, 4],
                                            "data_offsets": [0, 64]}}, bytes(64),
                 error="unsupported dtype")
_st_header_entry("st-shape-bytes-mismatch", {"w": {"dtype": "F32", "shape": [4, 5],
                                                   "data_offsets": [0, 64]}}, bytes(64),
                 error="need 80")
_st_header_entry("st-negative-offsets", {"w": {"dtype": "F32", "shape": [4, 4],
                                               "data_offsets": [64, 0]}}, bytes(64),
                 error="data_offsets")
_st_header_entry("st-bad-metadata", {"__metadata__": {"k": 3}, "w": _W}, bytes(64),
                 error="__metadata__")
_st_header_entry("st-gap-between-tensors",
                 {"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                  "b": {"dtype": "F32", "shape": [4, 4], "data_offsets": [96, 160]}}, bytes(160),
                 error="")
_st_header_entry("st-trailing-bytes", {"w": _W}, bytes(64 + 40), error="")
_st_header_entry("st-huge-dims-truncated-body", {"w": {"dtype": "F32", "shape": [1, BIG],
                                                       "data_offsets": [0, 4 * BIG]}}, bytes(4096),
                 error="truncated")
_st_header_entry("st-shape-overflow", {"w": {"dtype": "F32", "shape": [2**62, 2**62],
                                             "data_offsets": [0, 64]}}, bytes(64),
                 error="need")
_st_header_entry("st-modelpress-metadata-junk",
                 {"__metadata__": {"modelpress": "{not json"}, "w": _W}, bytes(64),
                 error="corrupt modelpress metadata")


@entry("st-zero-elements-huge-dim")
def _(d):
    return {"path": st_file(d / "model.safetensors", {
        "empty.weight": np.zeros((BIG, 0), np.float32), "fc.weight": weights(64, 64)}),
        "stage_args": ("--include", "*")}


# safetensors values


@entry("st-nan-weight")
def _(d):
    w = weights(64, 64)
    w[3, 5] = np.nan
    return {"path": st_file(d / "model.safetensors", {"fc.weight": w}),
            "compress_error": "tensor 'fc.weight' has 1 NaN/Inf values"}


@entry("st-inf-weight-allow-nonfinite")
def _(d):
    w = weights(64, 64)
    w[0, :3] = [np.inf, -np.inf, np.nan]
    return {"path": st_file(d / "model.safetensors", {"fc.weight": w, "fc2.weight": weights(64, 64)}),
            "group_args": ("--allow-nonfinite",), "untouched": ("fc.weight",)}


@entry("st-all-zeros")
def _(d):
    return {"path": st_file(d / "model.safetensors", {"fc.weight": np.zeros((64, 64), np.float32)})}


@entry("st-single-element")
def _(d):
    return {"path": st_file(d / "model.safetensors", {"fc.weight": np.array([[1.5]], np.float32)}),
            "group_args": ("--min-elements", "1")}


@entry("st-int64-named")
def _(d):
    return {"path": st_file(d / "model.safetensors", {"ids.weight": np.arange(4096).reshape(64, 64)}),
            "stage_args": ("--include", "ids.weight"),
            "compress_error": "tensor 'ids.weight' is int64"}


@entry("st-bool-named")
def _(d):
    return {"path": st_file(d / "model.safetensors", {"m.weight": np.ones((64, 64), bool)}),
            "stage_args": ("--include", "m.weight"),
            "compress_error": "tensor 'm.weight' is bool"}


@entry("st-int-and-bool-unselected")
def _(d):
    return {"path": st_file(d / "model.safetensors", {
        "ids": np.arange(4096, dtype=np.int64).reshape(64, 64), "flags": np.ones((64, 64), bool),
        "fc.weight": weights(64, 64)}), "untouched": ("ids", "flags")}


@entry("st-fp16")
def _(d):
    return {"path": st_file(d / "model.safetensors", {"fc.weight": weights(64, 96, dtype=np.float16)})}


@entry("st-bf16")
def _(d):
    return {"path": st_file(d / "model.safetensors",
                            {"fc.weight": weights(96, 64, dtype=ml_dtypes.bfloat16)})}


@entry("st-scalar-and-1d-named")
def _(d):
    return {"path": st_file(d / "model.safetensors", {
        "scale": np.array(0.5, np.float32), "bias": weights(64), "fc.weight": weights(64, 64)}),
        "stage_args": ("--include", "*"), "group_args": ("--min-elements", "1")}


def _compressed(d: Path, sample: str, stages: list[str]) -> Path:
    from compress_core import Recipe, compress
    from compress_core.stage import REGISTRY
    src = d / f"src{Path(sample).suffix}"
    shutil.copy(SAMPLES / sample, src)
    out = d / f"model{Path(sample).suffix}"
    stage = REGISTRY[stages[0]](**dict(zip(stages[1::2], stages[2::2])))
    compress(src, out, Recipe([stage]))
    src.unlink()
    return out


@entry("st-already-compressed")
def _(d):
    return {"path": _compressed(d, "mlp.safetensors", ["quantize", "bits", 4]),
            "compress_error": "already compressed"}


@entry("st-compressed-tampered-shape")
def _(d):
    from safetensors.numpy import load_file
    from safetensors import safe_open
    p = _compressed(d, "mlp.safetensors", ["quantize", "bits", 4])
    with safe_open(str(p), framework="np") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(p))
    tensors["fc1.weight_shape"] = np.array([10**6, 10**6], np.int64)
    save_file(tensors, str(p), metadata=metadata)
    return {"path": p, "compress_error": "already compressed", "decode_error": "fc1.weight"}


# ONNX


@entry("onnx-good-fp32")
def _(d):
    return {"path": save_onnx(d / "model.onnx", good_onnx())}


@entry("onnx-fp16")
def _(d):
    return {"path": save_onnx(d / "model.onnx", good_onnx(np.float16))}


@entry("onnx-bf16")
def _(d):
    return {"path": save_onnx(d / "model.onnx", good_onnx(ml_dtypes.bfloat16))}


@entry("onnx-raw-data-length-mismatch")
def _(d):
    model = good_onnx()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-12]
    return {"path": save_onnx(d / "model.onnx", model), "read_error": "'w1'"}


@entry("onnx-huge-dims-short-raw-data")
def _(d):
    bad = TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[1, BIG], raw_data=bytes(16))
    model = onnx_model([bad, numpy_helper.from_array(weights(64, 64), "w2")])
    return {"path": save_onnx(d / "model.onnx", model), "read_error": "'w1'"}


@entry("onnx-dims-overflow-int64")
def _(d):
    bad = TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[2**62, 8], raw_data=bytes(16))
    model = onnx_model([bad, numpy_helper.from_array(weights(64, 64), "w2")])
    return {"path": save_onnx(d / "model.onnx", model), "read_error": "'w1'"}


@entry("onnx-negative-dims")
def _(d):
    bad = TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[-4, 4], raw_data=bytes(64))
    model = onnx_model([bad, numpy_helper.from_array(weights(64, 64), "w2")])
    return {"path": save_onnx(d / "model.onnx", model), "read_error": "'w1'"}


@entry("onnx-unknown-data-type")
def _(d):
    model = good_onnx()
    model.graph.initializer[0].data_type = 99
    return {"path": save_onnx(d / "model.onnx", model), "read_error": "'w1'"}


@entry("onnx-missing-weight-input")
def _(d):
    model = good_onnx()
    del model.graph.initializer[0]
    return {"path": save_onnx(d / "model.onnx", model), "write_error": "w1"}


@entry("onnx-name-not-utf8")
def _(d):
    raw = good_onnx().SerializeToString().replace(b"w1", b"\xf71")
    (d / "model.onnx").write_bytes(raw)
    return {"path": d / "model.onnx", "read_error": "is not UTF-8 text"}


@entry("onnx-no-graph")
def _(d):
    model = onnx.ModelProto(ir_version=8)
    return {"path": save_onnx(d / "model.onnx", model), "read_error": "not a valid ONNX model"}


@entry("onnx-external-absolute")
def _(d):
    return {"path": external_model(d, "/etc/passwd"), "read_error": "not a relative path"}


@entry("onnx-external-escapes")
def _(d):
    return {"path": external_model(d, "../../etc/passwd"), "read_error": "outside the model's folder"}


@entry("onnx-external-escapes-to-sibling")
def _(d):
    (d.parent / "secret.bin").write_bytes(bytes(64 * 64 * 4))
    return {"path": external_model(d, "../secret.bin", data=None),
            "read_error": "outside the model's folder"}


@entry("onnx-external-symlink-escape")
def _(d):
    (d.parent / "secret2.bin").write_bytes(bytes(64 * 64 * 4))
    (d / "w1.bin").symlink_to(d.parent / "secret2.bin")
    return {"path": external_model(d, "w1.bin", data=None),
            "read_error": "outside the model's folder"}


@entry("onnx-external-missing")
def _(d):
    return {"path": external_model(d, "w1.bin", data=None), "read_error": "is missing"}


@entry("onnx-external-too-short")
def _(d):
    return {"path": external_model(d, "w1.bin", data=bytes(100)), "read_error": "'w1'"}


@entry("onnx-external-length-past-end")
def _(d):
    return {"path": external_model(d, "w1.bin", data=bytes(64 * 64 * 4), offset=16,
                                   length=64 * 64 * 4), "read_error": "too short"}


@entry("onnx-external-bad-offset")
def _(d):
    model_path = external_model(d, "w1.bin", data=bytes(64 * 64 * 4))
    model = onnx.load(str(model_path), load_external_data=False)
    e = model.graph.initializer[0].external_data.add()
    e.key, e.value = "offset", "-8"
    return {"path": save_onnx(model_path, model), "read_error": "'w1'"}


@entry("onnx-external-huge-dims")
def _(d):
    return {"path": external_model(d, "w1.bin", data=bytes(4096), dims=(1, BIG)), "read_error": "'w1'"}


@entry("onnx-external-location-nul")
def _(d):
    return {"path": external_model(d, "w1.bin\0.txt", data=None), "read_error": "not a valid path"}


@entry("onnx-external-location-not-utf8")
def _(d):
    path = external_model(d, "w1--bin", data=None)  # same length: protobuf lengths stay right
    path.write_bytes(path.read_bytes().replace(b"w1--bin", b"w1\xff\xfebin"))
    return {"path": path, "read_error": "not a valid path"}


@entry("onnx-external-symlink-loop")
def _(d):
    (d / "a.bin").symlink_to(d / "b.bin")
    (d / "b.bin").symlink_to(d / "a.bin")
    return {"path": external_model(d, "a.bin", data=None), "read_error": "loop of symbolic links"}


@entry("onnx-external-good")
def _(d):
    return {"path": external_model(d, "w1.bin", data=weights(64, 64, seed=3).tobytes())}


@entry("onnx-nan-weight")
def _(d):
    w1 = weights(64, 64)
    w1[1, 1] = np.nan
    return {"path": save_onnx(d / "model.onnx", good_onnx(w1=w1)),
            "compress_error": "tensor 'w1' has 1 NaN/Inf values"}


@entry("onnx-inf-weight-allow-nonfinite")
def _(d):
    w1 = weights(64, 64)
    w1[2, 2] = -np.inf
    return {"path": save_onnx(d / "model.onnx", good_onnx(w1=w1)),
            "group_args": ("--allow-nonfinite",), "untouched": ("w1",)}


@entry("onnx-all-zeros")
def _(d):
    return {"path": save_onnx(d / "model.onnx", good_onnx(w1=np.zeros((64, 64), np.float32)))}


@entry("onnx-scalar-and-zero-element-initializers")
def _(d):
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Mul", ["h", "s"], ["h2"]),
             helper.make_node("Concat", ["h2", "empty"], ["y"], axis=0)]
    inits = [numpy_helper.from_array(weights(64, 64), "w1"),
             numpy_helper.from_array(np.array(2.0, np.float32), "s"),
             numpy_helper.from_array(np.zeros((0, 64), np.float32), "empty")]
    model = onnx_model(inits, nodes, outputs=[helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, ["n", 64])])
    return {"path": save_onnx(d / "model.onnx", model), "stage_args": ("--include", "*"),
            "group_args": ("--min-elements", "1")}


@entry("onnx-int64-named")
def _(d):
    nodes = [helper.make_node("Gather", ["table", "x"], ["y"])]
    inits = [numpy_helper.from_array(np.arange(4096, dtype=np.int64).reshape(64, 64), "table")]
    model = onnx_model(inits, nodes, inputs=[helper.make_tensor_value_info(
        "x", TensorProto.INT64, [3])], outputs=[helper.make_tensor_value_info(
            "y", TensorProto.INT64, [3, 64])])
    return {"path": save_onnx(d / "model.onnx", model), "stage_args": ("--include", "table"),
            "compress_error": "tensor 'table' is int64"}


@entry("onnx-bool-named")
def _(d):
    nodes = [helper.make_node("Gather", ["table", "x"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((64, 64), bool), "table")]
    model = onnx_model(inits, nodes, inputs=[helper.make_tensor_value_info(
        "x", TensorProto.INT64, [3])], outputs=[helper.make_tensor_value_info(
            "y", TensorProto.BOOL, [3, 64])])
    return {"path": save_onnx(d / "model.onnx", model), "stage_args": ("--include", "table"),
            "compress_error": "tensor 'table' is bool"}


@entry("onnx-modelpress-metadata-junk")
def _(d):
    model = good_onnx()
    helper.set_model_props(model, {"modelpress": "{junk"})
    return {"path": save_onnx(d / "model.onnx", model), "read_error": "corrupt modelpress metadata"}


@entry("onnx-already-compressed")
def _(d):
    return {"path": _compressed(d, "mlp.onnx", ["quantize", "bits", 8]),
            "compress_error": "already compressed"}


@entry("onnx-compressed-tampered-metadata")
def _(d):
    p = _compressed(d, "mlp.onnx", ["quantize", "bits", 4])
    model = onnx.load(str(p))
    meta = json.loads(model.metadata_props[0].value)
    meta["tensors"]["fc1.weight"]["initializers"]["codes"] = "no-such-tensor"
    model.metadata_props[0].value = json.dumps(meta)
    return {"path": save_onnx(p, model), "read_error": "tensor 'fc1.weight' lacks"}


@entry("onnx-compressed-tampered-shape")
def _(d):
    p = _compressed(d, "mlp.onnx", ["quantize", "bits", 4])
    model = onnx.load(str(p))
    meta = json.loads(model.metadata_props[0].value)
    meta["tensors"]["fc1.weight"]["shape"] = [1000, 1000]
    model.metadata_props[0].value = json.dumps(meta)
    return {"path": save_onnx(p, model), "compress_error": "already compressed",
            "decode_error": "tensor 'fc1.weight': corrupt modelpress encoding"}


@entry("sample-mlp-onnx")
def _(d):
    return {"path": Path(shutil.copy(SAMPLES / "mlp.onnx", d / "model.onnx"))}


@entry("sample-cnn-safetensors")
def _(d):
    return {"path": Path(shutil.copy(SAMPLES / "cnn.safetensors", d / "model.safetensors"))}


def build_corpus(root: Path) -> list[Entry]:
    """Write every corpus entry under `root` (one folder each) and return them."""
    entries = []
    for name, build in _BUILDERS:
        folder = root / name
        folder.mkdir(parents=True)
        entries.append(Entry(name=name, **build(folder)))
    return entries


def names() -> list[str]:
    """Entry names, without building anything (for test ids)."""
    return [name for name, _ in _BUILDERS]
