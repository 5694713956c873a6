"""Depthwise, grouped and single-input-channel convolution kernels: grouped along each output
channel's whole kernel (C/g * kh * kw, flattened), never per weight along a size-1 axis.

Checked for every quantize layout (float scales, scale codes, zero points, multiplier
scales, 2-8 bits) in ONNX (onnxruntime decodes each weight to exactly what the file's tree
decodes to, and runs the model) and safetensors, and for the other stages whose axis
matters (cast --scale channel, cluster --per-channel, prune N:M).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import (Cast, Cluster, Options, Prune, Quantize, Recipe, TensorInfo, compare,
                        compress, decompress)
from modelpress.core.pipeline import measure_error
from modelpress.core.encoded import Dense, Quantized, Sparse, quantized_part
from modelpress.core.quantize.plan import plan_for
from modelpress.formats import open_model
from modelpress.formats.tree_check import check_tree

from conftest import ort_run, rng_weights, write_safetensors
from test_onnx_io import dequantized

ALL = Options(min_elements=1)
# name -> (shape, op, attributes); each is fed by its own input.
KERNELS = {
    "dw3": ((32, 1, 3, 3), "Conv", {"group": 32, "pads": [1, 1, 1, 1]}),
    "dw7": ((16, 1, 7, 7), "Conv", {"group": 16, "pads": [3, 3, 3, 3]}),
    "grouped": ((32, 4, 3, 3), "Conv", {"group": 8, "pads": [1, 1, 1, 1]}),
    "rgb": ((24, 3, 3, 3), "Conv", {}),                       # a stem: 3 input channels
    "conv1d": ((16, 1, 64), "Conv", {}),                      # one input channel, 1-D
    "dw_transposed": ((32, 1, 2, 2), "ConvTranspose", {"group": 32, "strides": [2, 2]}),
}
INPUTS = {"dw3": [1, 32, 6, 6], "dw7": [1, 16, 6, 6], "grouped": [1, 32, 6, 6],
          "rgb": [1, 3, 6, 6], "conv1d": [1, 1, 80], "dw_transposed": [1, 32, 3, 3]}
OUTPUTS = {"dw3": [1, 32, 6, 6], "dw7": [1, 16, 6, 6], "grouped": [1, 32, 6, 6],
           "rgb": [1, 24, 4, 4], "conv1d": [1, 16, 17], "dw_transposed": [1, 32, 6, 6]}


def conv_model(path: Path) -> Path:
    nodes, inits, inputs, outputs = [], [], [], []
    for i, (name, (shape, op, attrs)) in enumerate(KERNELS.items()):
        w = rng_weights(*shape, seed=i) * np.exp(rng_weights(shape[0], *[1] * (len(shape) - 1),
                                                             seed=i + 50))
        inits.append(numpy_helper.from_array(w, name))
        nodes.append(helper.make_node(op, [f"x_{name}", name], [f"y_{name}"], **attrs))
        inputs.append(helper.make_tensor_value_info(f"x_{name}", TensorProto.FLOAT, INPUTS[name]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, OUTPUTS[name]))
    graph = helper.make_graph(nodes, "kernels", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def feeds() -> dict[str, np.ndarray]:
    return {f"x_{n}": rng_weights(*s, seed=9) for n, s in INPUTS.items()}


def kernel(name: str) -> int:
    """Weights per output channel of a kernel (its flattened reduction)."""
    shape = KERNELS[name][0]
    return math.prod(shape[1:])


def test_roles_give_conv_kernels_a_block_span(tmp_path: Path) -> None:
    store = open_model(conv_model(tmp_path / "m.onnx"))
    axes = {n: (i.channel_axis, i.block_axis, i.block_span) for n, i in store.tensors.items()}
    assert axes["dw3"] == axes["grouped"] == axes["rgb"] == (0, 1, 3)
    assert axes["conv1d"] == (0, 1, 2)
    assert axes["dw_transposed"] == (0, 1, 3)  # grouped ConvTranspose: per input channel


def info(shape: tuple[int, ...], fmt: str = "onnx") -> TensorInfo:
    return TensorInfo("w", shape, np.dtype(np.float32), True, 0, 1, role="Conv", format=fmt,
                      block_span=len(shape) - 1)


@pytest.mark.parametrize("shape, stage, fmt, span, group", [
    ((64, 1, 3, 3), Quantize(bits=8), "onnx", 3, 9),          # one group of 9 per channel
    ((64, 1, 3, 3), Quantize(bits=4), "onnx", 3, 9),
    ((64, 1, 7, 7), Quantize(bits=4), "onnx", 3, 13),         # 4 groups of 13, not 16 + pad
    ((64, 4, 3, 3), Quantize(bits=4), "onnx", 3, 12),
    ((64, 1, 256), Quantize(bits=8), "onnx", 2, 64),          # the 8-bit rule on 256 inputs
    ((64, 1, 3, 3), Quantize(bits=4), "safetensors", 3, 9),
    ((64, 16, 3, 3), Quantize(bits=4, group_size=32), "onnx", 3, 32),
    ((64, 64, 3, 3), Quantize(bits=4), "onnx", 1, 16),        # a long input axis: as before
    ((64, 16, 3, 3), Quantize(bits=4, group_size=8), "onnx", 1, 8),
])
def test_plan_flattens_short_input_axes(shape, stage, fmt, span, group) -> None:
    plan = plan_for(stage, info(shape, fmt))
    assert (plan.block_span, plan.group_size) == (span, group)


@pytest.mark.parametrize("shape", [(64, 1, 3, 3), (64, 1, 7, 7), (64, 12, 3, 3), (64, 15, 2),
                                   (64, 9, 1, 1), (64, 3, 4, 4), (64, 1, 256)])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_resolved_group_replays_to_the_same_plan(shape: tuple[int, ...], bits: int) -> None:
    first = plan_for(Quantize(bits=bits), info(shape))
    again = plan_for(Quantize(bits=bits, group_size=first.group_size), info(shape))
    assert (again.block_span, again.group_size) == (first.block_span, first.group_size)
    if math.prod(shape[2:]) == 1:
        assert first.block_span == 1   # nothing to flatten: the kernel is its input axis


LAYOUTS = {
    "int8": Quantize(bits=8),
    "int8-asym": Quantize(bits=8, scheme="asym"),
    "int4": Quantize(bits=4),
    "int4-float-scales": Quantize(bits=4, scale_bits=0),
    "int3-float-asym": Quantize(bits=3, scheme="asym", scale_bits=0),
    "int5-zero3": Quantize(bits=5, scheme="asym", zero_bits=3),
    "int6-g8": Quantize(bits=6, group_size=8),
    "int2-multipliers": Quantize(bits=2, super_block=32, group_size=16),
    "int7-channel": Quantize(bits=7, granularity="channel"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_groups_whole_kernels_and_runs(tmp_path: Path, layout: str) -> None:
    src, dst = conv_model(tmp_path / "m.onnx"), tmp_path / "o.onnx"
    report = compress(src, dst, Recipe([LAYOUTS[layout]]), ALL)
    assert sorted(r.name for r in report.rows) == sorted(KERNELS)
    store = open_model(dst)
    for name, (shape, _, _) in KERNELS.items():
        q = quantized_part(store.decode(name))
        per_channel = q.scale.size // shape[q.channel_axis or 0] if q.granularity == "channel" \
            else q.scale.size // shape[0]
        group = q.group_size or kernel(name)
        # Never a scale per weight of a size-1 axis: at most one per group of the kernel.
        assert per_channel <= math.ceil(kernel(name) / min(group, kernel(name))), name
        if q.granularity == "group" and shape[1] < q.group_size:
            assert q.block_span == len(shape) - 1, name
        np.testing.assert_array_equal(dequantized(dst, name), q.decode(), err_msg=name)
    if layout == "int2-multipliers":  # 64 inputs of the 1-D kernel tile super-blocks of 32
        assert quantized_part(store.decode("conv1d")).super_block == 32
    want, got = ort_run(src, feeds()), ort_run(dst, feeds())
    for a, b in zip(want, got):
        assert b.shape == a.shape and np.isfinite(b).all()
    dense = tmp_path / "dense.onnx"
    decompress(dst, dense)
    back = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dense)).graph.initializer}
    for name in KERNELS:
        np.testing.assert_array_equal(back[name], store.decode(name).decode())


def test_int8_depthwise_bytes_and_output(tmp_path: Path) -> None:
    w = rng_weights(512, 1, 3, 3) * np.exp(rng_weights(512, 1, 1, 1, seed=1))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "dw"], ["y"], group=512, pads=[1, 1, 1, 1])], "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512, 4, 4])],
        [numpy_helper.from_array(w, "dw")])
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(src))
    report = compress(src, dst, Recipe([Quantize(bits=8)]))   # 4,608 weights: a default target
    (row,) = report.rows
    # 8-bit codes plus an 8-bit scale code per 9 weights (before: one per weight, 0.506x).
    assert row.encoding == "int8 g9 sym s8"
    assert row.bytes_after < 0.29 * row.bytes_before
    x = {"x": rng_weights(1, 512, 4, 4, seed=2)}
    want, got = ort_run(src, x)[0], ort_run(dst, x)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01


@pytest.mark.parametrize("recipe", [[Quantize(bits=4)], [Quantize(bits=8)],
                                    [Prune(pattern="2:4"), Quantize(bits=4)]])
def test_safetensors_conv_kernels_round_trip(tmp_path: Path, recipe: list) -> None:
    tensors = {"dw.weight": rng_weights(64, 1, 3, 3), "g.weight": rng_weights(64, 4, 3, 3, seed=1)}
    src, dst = write_safetensors(tmp_path / "w.safetensors", tensors), tmp_path / "o.safetensors"
    compress(src, dst, Recipe(recipe), ALL)
    store = open_model(dst)
    dense = tmp_path / "dense.safetensors"
    decompress(dst, dense)
    for name, w in tensors.items():
        tree = store.decode(name)
        check_tree(tree, w.shape)
        q = quantized_part(tree)
        assert q.scale.size <= 2 * w.shape[0], name   # at most 2 scales per output channel
        np.testing.assert_array_equal(open_model(dense).read(name), tree.decode())


def test_block_span_from_a_damaged_file_is_refused() -> None:
    q = Quantize(bits=4).apply(Dense(rng_weights(8, 1, 3, 3)), info((8, 1, 3, 3)))
    assert q.block_span == 3 and q.scale.shape == (8, 1, 1, 1)
    check_tree(q, (8, 1, 3, 3))
    bad = Quantized(q.codes, q.scale, q.zero_point, q.bits, "group", None, 1, q.group_size,
                    q.scale_code, q.zero_bits, block_span=4)
    with pytest.raises(ValueError, match="block span 4 does not fit"):
        check_tree(bad, (8, 1, 3, 3))


def test_cast_and_cluster_channels_are_output_channels(tmp_path: Path) -> None:
    src = conv_model(tmp_path / "m.onnx")
    for stage, attr in ((Cast(dtype="fp8-e4m3", scale="channel"), "scale"),
                        (Cluster(bits=3, per_channel=True), "lut")):
        dst = tmp_path / f"{stage.id}.onnx"
        compress(src, dst, Recipe([stage]), ALL)
        store = open_model(dst)
        for name, (shape, _, _) in KERNELS.items():
            table = getattr(store.decode(name), attr)
            assert table.shape[0] == shape[0], (stage.id, name)   # one per output channel
        for want, got in zip(ort_run(src, feeds()), ort_run(dst, feeds())):
            assert got.shape == want.shape


def test_prune_n_m_runs_along_the_whole_kernel(tmp_path: Path) -> None:
    src, dst = conv_model(tmp_path / "m.onnx"), tmp_path / "o.onnx"
    report = compress(src, dst, Recipe([Prune(pattern="2:4")]), ALL)
    store = open_model(dst)
    grouped = store.decode("grouped").decode() != 0                # C/g = 4: along it, as before
    assert (grouped.sum(axis=1) == 2).all()
    conv1d = store.decode("conv1d").decode() != 0                  # [16, 1, 64]: along 64
    assert (conv1d.reshape(16, 16, 4).sum(axis=2) == 2).all()
    assert ("dw3: prune left it as is (its input dimension (1) or its kernel's 9 is not a "
            "multiple of 4, so --pattern 2:4 does not fit it)") in report.notes
    pruned = Prune(pattern="2:4").apply(Dense(rng_weights(8, 2, 2, 2)), info((8, 2, 2, 2)))
    assert isinstance(pruned, Sparse)                              # C/g = 2: along the 8
    assert (pruned.mask.reshape(8, 2, 4).sum(axis=2) == 2).all()


def test_error_of_a_spanned_tensor_is_measured_in_slabs_as_whole(monkeypatch) -> None:
    monkeypatch.setattr("modelpress.core.pipeline._DECODE_CHUNK", 150)  # 3 channels a slab
    w = rng_weights(40, 2, 5, 5)
    q = Quantize(bits=4, scale_bits=0).apply(Dense(w), info(w.shape))
    assert q.block_span == 3 and q.scale_code is None
    sliced = measure_error(w, q)
    whole = compare(w, q.decode())
    assert sliced.rel_l2 == pytest.approx(whole.rel_l2, rel=1e-6)
    assert sliced.max_abs == whole.max_abs
