"""quantize --method gptq --sequential (the default): layers rounded in order, each towards the
original model's outputs on the inputs the rounded layers before it give.

Against --no-sequential on the output error onnxruntime computes on inputs other than the
calibration ones, at the same bytes; the moved target checked against its closed form; the
row guard and the notes; the command line's switch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import Quantize, Recipe, compress
from modelpress.core.pipeline import Options
from modelpress.core.prune import Prune
from modelpress.core.quantize.gptq import moved_target
from modelpress.core.tensorinfo import SecondMoments, TensorInfo
from modelpress.formats.onnx import calibrate, sequential

from conftest import ort_run, run_cli

WIDTH, DEPTH = 32, 4


def _deep_mlp(path: Path) -> Path:
    """x [batch, WIDTH] -> DEPTH x (MatMul [WIDTH, WIDTH] -> Tanh) -> MatMul: errors of the
    early layers reach the later ones' inputs."""
    rng = np.random.default_rng(3)
    nodes, weights, name = [], {}, "x"
    for i in range(DEPTH + 1):
        weights[f"w{i}"] = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH) * 1.5
                            ).astype(np.float32)
        out = "y" if i == DEPTH else f"h{i}"
        nodes.append(helper.make_node("MatMul", [name, f"w{i}"], [out]))
        if i < DEPTH:
            nodes.append(helper.make_node("Tanh", [out], [f"t{i}"]))
            name = f"t{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", WIDTH])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _inputs(samples: int, seed: int) -> dict[str, np.ndarray]:
    mix = np.random.default_rng(99).standard_normal((WIDTH // 2, WIDTH)).astype(np.float32)
    z = np.random.default_rng(seed).standard_normal((samples, WIDTH // 2)).astype(np.float32)
    return {"x": z @ mix / 2}


def _error(src: Path, dst: Path, feeds: dict[str, np.ndarray]) -> float:
    reference = ort_run(src, feeds, exact=True)[0]
    out = ort_run(dst, feeds, exact=True)[0]
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def _both(tmp_path: Path, samples: int, bits: int = 3) -> dict[bool, tuple[float, int, object]]:
    src = _deep_mlp(tmp_path / "deep.onnx")
    np.savez(tmp_path / "cal.npz", **_inputs(samples, seed=1))
    feeds = _inputs(256, seed=2)
    found = {}
    for ordered in (False, True):
        dst = tmp_path / f"{ordered}.onnx"
        report = compress(src, dst, Recipe([Quantize(bits=bits, sequential=ordered)]),
                          Options(min_elements=16), calibration=str(tmp_path / "cal.npz"))
        found[ordered] = (_error(src, dst, feeds), dst.stat().st_size, report)
    return found


def test_rounding_in_order_lowers_the_output_error_at_the_same_bytes(tmp_path: Path) -> None:
    found = _both(tmp_path, samples=512)
    assert found[True][1] == found[False][1]
    assert found[True][0] < 0.9 * found[False][0], found
    notes = found[True][2].notes
    # w0 reads the model's input, which nothing rounded changes.
    assert any(n.startswith(f"--calibration: sequential: {DEPTH} of {DEPTH} layers rounded")
               for n in notes), notes
    assert not any("sequential" in n for n in found[False][2].notes)


def test_layers_with_few_rows_per_input_keep_the_original_statistics(tmp_path: Path) -> None:
    """64 rows for 32 inputs: under ROWS_PER_INPUT, no layer gets the correction, and the
    file is the one --no-sequential writes."""
    found = _both(tmp_path, samples=64)
    assert ("--calibration: sequential: no MatMul/Gemm layer has 4 input rows per input; each "
            "is rounded on the original model's inputs") in found[True][2].notes
    assert (tmp_path / "True.onnx").read_bytes() == (tmp_path / "False.onnx").read_bytes()


def test_over_the_memory_limit_it_is_not_done(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sequential, "MAX_HELD_BYTES", 4 * WIDTH * WIDTH * 2)
    found = _both(tmp_path, samples=512)
    assert any(n.startswith("--calibration: sequential: not done (the rounded weights it "
                            "would hold as float32 come to 0 MiB, over 0 MiB)")
               for n in found[True][2].notes), found[True][2].notes
    assert (tmp_path / "True.onnx").read_bytes() == (tmp_path / "False.onnx").read_bytes()


def test_moments_collected_for_one_use_are_dropped_when_taken() -> None:
    moments = SecondMoments.once(np.eye(3))
    np.testing.assert_array_equal(moments.load(), np.eye(3, dtype=np.float32))
    with pytest.raises(RuntimeError, match="one use"):
        moments.load()


def test_the_moved_target_fits_the_original_outputs_on_the_moved_inputs() -> None:
    """Inputs moved by a linear map X~ = X A: W' = A^-1 W gives X~ W' = X W exactly, and
    W + H~^-1 S W is that (up to the damping) in both weight layouts."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 8))
    a = np.eye(8) + 0.1 * rng.standard_normal((8, 8))
    moved = x @ a
    h = moved.T @ moved / len(x)
    s = moved.T @ (x - moved) / len(x)
    w = rng.standard_normal((8, 5)).astype(np.float32)  # MatMul [K, N]
    exact = np.linalg.solve(a, w)
    matmul = TensorInfo("w", (8, 5), np.dtype("float32"), role="MatMul", channel_axis=1,
                        block_axis=0)
    found = moved_target(w, matmul, h.astype(np.float32), s.astype(np.float32))
    assert np.abs(found - exact).max() < 0.05 * np.abs(exact).max()
    assert np.abs(found - exact).max() < 0.2 * np.abs(w - exact).max()
    gemm = TensorInfo("w", (5, 8), np.dtype("float32"), role="Gemm", channel_axis=0,
                      block_axis=1)
    np.testing.assert_allclose(moved_target(w.T.copy(), gemm, h.astype(np.float32),
                                            s.astype(np.float32)), found.T, rtol=1e-5,
                               atol=1e-6)


def test_segments_follow_the_graph_and_are_capped(tmp_path: Path, monkeypatch) -> None:
    graph = onnx.load(str(_deep_mlp(tmp_path / "deep.onnx")))
    layers = calibrate.layer_inputs(graph, {f"w{i}": (WIDTH, WIDTH) for i in range(DEPTH + 1)})
    assert sequential.segments(graph, layers) == [[f"w{i}"] for i in range(DEPTH + 1)]
    monkeypatch.setattr(sequential, "MAX_RUNS", 2)
    parts = sequential.segments(graph, layers)
    assert len(parts) == 2 and sum(parts, []) == [f"w{i}" for i in range(DEPTH + 1)]


def test_the_command_line_switch(tmp_path: Path) -> None:
    src = _deep_mlp(tmp_path / "deep.onnx")
    np.savez(tmp_path / "cal.npz", **_inputs(512, seed=1))
    for flag, expected in (("--sequential", True), ("--no-sequential", False)):
        out = tmp_path / f"{flag}.onnx"
        result = run_cli(["compress", src, "-o", out, "--calibration", tmp_path / "cal.npz",
                          "--min-elements", "16", "--print-recipe", "quantize", "--bits", "3",
                          flag])
        assert result.exit_code == 0, result.output
        assert f"sequential: {str(expected).lower()}" in result.output


def test_global_pruning_rounds_each_layer_on_the_original_inputs(tmp_path: Path) -> None:
    """A stage that looks at all its tensors first (global pruning) cannot see a segment at a
    time: the run says so and writes what --no-sequential writes."""
    src = _deep_mlp(tmp_path / "deep.onnx")
    np.savez(tmp_path / "cal.npz", **_inputs(512, seed=1))
    found = {}
    for ordered in (True, False):
        recipe = Recipe([Prune(sparsity=0.3, scope="global"),
                         Quantize(bits=4, sequential=ordered)])
        dst = tmp_path / f"{ordered}.onnx"
        found[ordered] = compress(src, dst, recipe, Options(min_elements=16),
                                  calibration=str(tmp_path / "cal.npz"))
    assert any(n.startswith("--calibration: sequential: not done (a stage looks at all its "
                            "tensors first") for n in found[True].notes), found[True].notes
    assert (tmp_path / "True.onnx").read_bytes() == (tmp_path / "False.onnx").read_bytes()
