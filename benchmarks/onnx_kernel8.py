"""onnxruntime's 8-bit MatMulNBits against a float32 MatMul: where the 8-bit kernel form pays.

For each matrix size and number of input rows, builds a float32 MatMul and
the same weight as int8 codes in a blocked DequantizeLinear (the form
modelpress writes; onnxruntime fuses it into MatMulNBits bits=8,
accuracy_level 4 under default session options), and prints the median
latency ratio (kernel / float32; below 1 is faster), interleaving the two
sessions and repeating so that load from other processes hits both. Also
the same weight as MatMulNBits with accuracy_level 0 (float activations),
and the output's relative difference from the float32 run (the int8
activations' cost). Sets KERNEL8_MIN_WEIGHTS in formats/onnx_sites.py.

    python benchmarks/onnx_kernel8.py [--sizes 512x512 1024x1024 4096x4096] [--rows 1 16 256]
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


def _model(path: Path, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], k: int,
           n: int) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["m", k])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["m", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def build(tmp: Path, k: int, n: int, block: int) -> dict[str, Path]:
    """float32, blocked DequantizeLinear (int8), and MatMulNBits accuracy_level 0 models."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = (rng.random((k // block, n)) * 0.01 + 0.001).astype(np.float32)
    weight = codes.astype(np.float32) * np.repeat(scale, block, axis=0)
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    dq = helper.make_node("DequantizeLinear", ["c", "s"], ["w"], axis=0, block_size=block)
    packed = (codes.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // block, block)
    nbits = helper.make_node("MatMulNBits", ["x", "b", "st"], ["y"], domain="com.microsoft",
                             K=k, N=n, bits=8, block_size=block, accuracy_level=0)
    return {
        "float32": _model(tmp / "f.onnx", [matmul], [numpy_helper.from_array(weight, "w")], k, n),
        "kernel": _model(tmp / "d.onnx", [dq, matmul], [numpy_helper.from_array(codes, "c"),
                                                        numpy_helper.from_array(scale, "s")], k, n),
        "level 0": _model(tmp / "n.onnx", [nbits], [
            numpy_helper.from_array(packed, "b"),
            numpy_helper.from_array(np.ascontiguousarray(scale.T), "st")], k, n),
    }


def median_call(session, feeds: dict[str, np.ndarray], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import onnxruntime as ort
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024", "768x3072",
                                                       "4096x4096"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, default session options; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; block {args.block}\n")
    print("| K x N | rows | kernel / float32 (median, range) | accuracy_level 0 / float32 "
          "| kernel output rel. diff |")
    print("|---|---:|---:|---:|---:|")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as name:
        for size in args.sizes:
            k, n = (int(v) for v in size.split("x"))
            paths = build(Path(name), k, n, args.block)
            sessions = {key: ort.InferenceSession(str(p), options,
                                                  providers=["CPUExecutionProvider"])
                        for key, p in paths.items()}
            for rows in args.rows:
                feeds = {"x": np.random.default_rng(1).standard_normal((rows, k)).astype(
                    np.float32)}
                ref = sessions["float32"].run(None, feeds)[0]
                got = sessions["kernel"].run(None, feeds)[0]
                diff = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                runs = max(5, 400 // rows)
                ratios: dict[str, list[float]] = {"kernel": [], "level 0": []}
                for _ in range(args.repeat):   # interleaved: load hits every session alike
                    base = median_call(sessions["float32"], feeds, runs)
                    for key in ratios:
                        ratios[key].append(median_call(sessions[key], feeds, runs) / base)
                kernel, level0 = ratios["kernel"], ratios["level 0"]
                print(f"| {k} x {n} | {rows} | {statistics.median(kernel):.2f}x "
                      f"({min(kernel):.2f}-{max(kernel):.2f}) | {statistics.median(level0):.2f}x "
                      f"| {diff:.1e} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
