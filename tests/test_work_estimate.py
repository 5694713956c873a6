"""The budgeted search's count of a run's multiply-adds (modelpress.formats.onnx.work_estimate),
against counts made by hand from the layers' shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelpress.formats.onnx.work_estimate import run_macs


def _save(path: Path, nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(w.astype(np.float32), n)
                               for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _conv_gemm(path: Path, batch) -> Path:
    """x [batch, 8, 10, 10] -> Conv 16x8x3x3 (pads 1) -> grouped Conv 16x4x3x3 (group 4,
    stride 2) -> Flatten -> Gemm (transA on a transposed copy) [1600 -> 5]."""
    nodes = [helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "c2"], ["b"], group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["b"], ["f"]),
             helper.make_node("Transpose", ["f"], ["ft"], perm=[1, 0]),
             helper.make_node("Gemm", ["ft", "g"], ["y"], transA=1),
             helper.make_node("MatMul", ["y", "m"], ["z"])]
    rng = np.random.default_rng(0)
    weights = {"c1": rng.standard_normal((16, 8, 3, 3)), "c2": rng.standard_normal((16, 4, 3, 3)),
               "g": rng.standard_normal((400, 5)), "m": rng.standard_normal((5, 7))}
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [batch, 8, 10, 10])],
                 [helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 7])], weights)


def _by_hand(samples: int) -> int:
    per_sample = (16 * 10 * 10) * (8 * 9) + (16 * 5 * 5) * (4 * 9) + 5 * 400 + 7 * 5
    return samples * per_sample


def test_products_are_counted_from_the_shapes_a_run_sees(tmp_path: Path) -> None:
    src = _conv_gemm(tmp_path / "m.onnx", "batch")
    feeds = {"x": np.ones((6, 8, 10, 10), np.float32)}
    assert run_macs(src, feeds) == _by_hand(6)


def test_a_fixed_batch_is_run_whole(tmp_path: Path) -> None:
    src = _conv_gemm(tmp_path / "m.onnx", 6)
    assert run_macs(src, {"x": np.ones((6, 8, 10, 10), np.float32)}) == _by_hand(6)


def test_recurrent_layers_count_each_step(tmp_path: Path) -> None:
    """An LSTM over 9 steps, batch 3, input 4, hidden 5: each step multiplies W [1, 20, 4]
    and R [1, 20, 5]."""
    rng = np.random.default_rng(1)
    src = _save(tmp_path / "lstm.onnx", [helper.make_node("LSTM", ["x", "w", "r"], ["y"],
                                                           hidden_size=5)],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                {"w": rng.standard_normal((1, 20, 4)), "r": rng.standard_normal((1, 20, 5))})
    assert run_macs(src, {"x": np.ones((9, 3, 4), np.float32)}) == 9 * 3 * (80 + 100)
