"""Corpus entries: damaged files of either format, safetensors headers, odd tensor values."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from corpus import BIG, SAMPLES, Hostile, compressed, entry, marker_path, st_file, st_raw, weights


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
# Issue 15 item 5 (RecursionError) and item 16 (the last of two equal keys won silently).
_st_header_entry("st-header-nested-100k-deep",
                 b'{"__metadata__": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
                 error="nested too deeply")
_st_header_entry("st-header-duplicate-tensor",
                 b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, '
                 b'"w": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]}}', bytes(64),
                 error="key 'w' appears more than once")
_st_header_entry("st-header-duplicate-metadata-key",
                 b'{"__metadata__": {"a": "1", "a": "2"}, '
                 b'"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}', bytes(64),
                 error="key 'a' appears more than once")
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
        "stage_args": ("--include", "*", "--take-all-named"), "group_args": ("--min-elements", "1")}


@entry("st-already-compressed")
def _(d):
    return {"path": compressed(d, "mlp.safetensors", ["quantize", "bits", 4]),
            "compress_error": "already compressed"}


@entry("st-compressed-tampered-shape")
def _(d):
    p = compressed(d, "mlp.safetensors", ["quantize", "bits", 4])
    with safe_open(str(p), framework="np") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(p))
    tensors["fc1.weight_shape"] = np.array([10**6, 10**6], np.int64)
    save_file(tensors, str(p), metadata=metadata)
    return {"path": p, "compress_error": "already compressed", "decode_error": "fc1.weight"}


# ONNX


@entry("st-compressed-zero-multipliers")
def _(d):
    # Multiplier scales (--super-block) whose multipliers were overwritten with 0: every
    # scale would be 0; the reader refuses the tree.
    p = compressed(d, "mlp.safetensors", ["quantize", "bits", 4, "super_block", 64])
    with safe_open(str(p), framework="np") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(p))
    key = "fc1.weight.mp_scale_multipliers"
    tensors[key] = np.zeros_like(tensors[key])
    save_file(tensors, str(p), metadata=metadata)
    return {"path": p, "compress_error": "already compressed", "decode_error": "fc1.weight"}
