"""onnxruntime latency of compressed ONNX models against the original, and what gets folded.

For an MLP of 1024-wide MatMul layers (built here) and the sample
transformer, compresses with several recipes, then runs each model in
onnxruntime on CPU with one thread and prints a Markdown table of the median
latency over --runs calls, its ratio to the original model's, the file size
ratio, and which decode ops are left in the graph onnxruntime actually runs
(SessionOptions.optimized_model_filepath): a codebook's BitShift /
BitwiseAnd / Gather chain and an fp16 Cast are constant-folded at load, so
nothing of them should be left; DequantizeLinear is never folded (it is fused
into a 4-bit MatMul kernel or runs at every call).

    python benchmarks/onnx_latency.py [--runs 200] [--width 1024] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress import Cast, Cluster, Factorize, Prune, Quantize, Recipe, compress

RECIPES = {
    "cluster --bits 4": [Cluster(bits=4)],
    "cluster --bits 4 --per-channel": [Cluster(bits=4, per_channel=True)],
    "prune 0.5 + cluster --bits 4": [Prune(sparsity=0.5), Cluster(bits=4)],
    "cast --dtype fp16": [Cast(dtype="fp16")],
    "cast --dtype fp8-e4m3": [Cast(dtype="fp8-e4m3")],
    "quantize --bits 4 --group-size 32": [Quantize(bits=4, group_size=32)],
    "lowrank --rank-ratio 0.25": [Factorize(rank_ratio=0.25)],
}
DECODE_OPS = {"BitShift", "BitwiseAnd", "Gather", "GatherElements", "Cast", "DequantizeLinear",
              "ReduceSum", "Slice", "Transpose", "Mul"}


def mlp(path: Path, width: int, layers: int) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"fc{i}.weight"))
        nodes.append(helper.make_node("MatMul", [current, f"fc{i}.weight"], [f"h{i}"]))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
        current = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", width])], [helper.make_tensor_value_info(
            current, TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warning about saving an optimized model
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency(path: Path, feeds: dict[str, np.ndarray], runs: int) -> float:
    sess = session(path)
    for _ in range(10):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def left_ops(path: Path, original_ops: set[str], tmp: Path) -> str:
    """Decode ops (not in the original graph) left after onnxruntime's load-time folding."""
    session(path, tmp / "optimized.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp / "optimized.onnx")).graph.node]
    extra = sorted({op for op in ops if op in DECODE_OPS and op not in original_ops})
    return ", ".join(extra) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          "onnxruntime with 1 thread")
    print()
    print("| model | recipe | median latency ms | latency vs original | file size vs original "
          "| decode ops left after load |")
    print("|---|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = {
            f"MLP {args.layers}x{args.width}": (mlp(tmp / "mlp.onnx", args.width, args.layers),
                                               {"x": np.random.default_rng(1).standard_normal(
                                                   (16, args.width)).astype(np.float32)}),
            "sample transformer": (ROOT / "sample_models" / "transformer.onnx",
                                   {"input_ids": np.arange(64, dtype=np.int64).reshape(1, 64)}),
        }
        for label, (src, feeds) in models.items():
            original_ops = {n.op_type for n in onnx.load(str(src)).graph.node}
            base = latency(src, feeds, args.runs)
            print(f"| {label} | (original) | {1000 * base:.3f} | 1.00x | 1.000x | - |")
            for name, stages in RECIPES.items():
                dst = tmp / f"out_{len(name)}.onnx"
                report = compress(src, dst, Recipe(stages))
                t = latency(dst, feeds, args.runs)
                print(f"| {label} | {name} | {1000 * t:.3f} | {t / base:.2f}x | "
                      f"{report.ratio:.3f}x | {left_ops(dst, original_ops, tmp)} |")
                dst.unlink()
    print()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
