"""Corpus entries: ONNX models with damaged tensors, hostile external data, odd values."""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelpress.formats.onnx.meta import decode_doc, encode_doc

from corpus import (BIG, SAMPLES, compressed, entry, external_model, good_onnx, onnx_model,
                    save_onnx, weights)


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


@entry("onnx-invalid-attribute")
def _(d):
    model = good_onnx()
    model.graph.node[1].attribute.append(helper.make_attribute("axis", 1))  # MatMul has none
    return {"path": save_onnx(d / "model.onnx", model), "write_error": "Unrecognized attribute"}


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


@entry("onnx-external-and-raw-data")
def _(d):
    # Issue 15 item 1: onnxruntime runs the external bytes; raw_data is a different tensor.
    model_path = external_model(d, "w1.bin", data=weights(64, 64, seed=1).tobytes())
    model = onnx.load(str(model_path), load_external_data=False)
    model.graph.initializer[0].raw_data = weights(64, 64, seed=9).tobytes()
    return {"path": save_onnx(model_path, model), "read_error": "the model is ambiguous"}


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
    return {"path": save_onnx(d / "model.onnx", model),
            "stage_args": ("--include", "*", "--take-all-named"),
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
    return {"path": compressed(d, "mlp.onnx", ["quantize", "bits", 8]),
            "compress_error": "already compressed"}


@entry("onnx-compressed-tampered-metadata")
def _(d):
    p = compressed(d, "mlp.onnx", ["quantize", "bits", 4])
    model = onnx.load(str(p))
    meta = decode_doc(model.metadata_props[0].value)
    meta["tensors"]["fc1.weight"]["initializers"]["codes"] = "no-such-tensor"
    model.metadata_props[0].value = encode_doc(meta)
    return {"path": save_onnx(p, model), "read_error": "tensor 'fc1.weight' lacks"}


@entry("onnx-compressed-tampered-shape")
def _(d):
    p = compressed(d, "mlp.onnx", ["quantize", "bits", 4])
    model = onnx.load(str(p))
    meta = decode_doc(model.metadata_props[0].value)
    meta["tensors"]["fc1.weight"]["shape"] = [1000, 1000]
    model.metadata_props[0].value = encode_doc(meta)
    return {"path": save_onnx(p, model), "compress_error": "already compressed",
            "decode_error": "tensor 'fc1.weight': corrupt modelpress encoding"}


@entry("onnx-compressed-multiplier-base-not-float16")
def _(d):
    p = compressed(d, "mlp.onnx", ["quantize", "bits", 4, "super_block", 64])
    model = onnx.load(str(p))
    meta = decode_doc(model.metadata_props[0].value)
    spec = meta["tensors"]["fc1.weight"]
    assert spec["super_block"] == 64
    name = spec["initializers"]["scale_base"]
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            wide = numpy_helper.to_array(tensor).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(wide, name))
    return {"path": save_onnx(p, model), "compress_error": "already compressed",
            "decode_error": "tensor 'fc1.weight': corrupt modelpress encoding"}


@entry("sample-mlp-onnx")
def _(d):
    return {"path": Path(shutil.copy(SAMPLES / "mlp.onnx", d / "model.onnx"))}


@entry("sample-cnn-safetensors")
def _(d):
    return {"path": Path(shutil.copy(SAMPLES / "cnn.safetensors", d / "model.safetensors"))}
