"""Whole-process wall time of 4-bit ONNX quantization: modelpress against onnxruntime's quantizer.

A synthetic ~50M-parameter MatMul model (12 matrices of 2048x2048, column
scales log-normal) is written to a temporary folder; each tool runs in a fresh
process (imports, load, quantize, save), in alternating order, twice. Prints a
Markdown table: seconds, ratio to onnxruntime's MatMulNBitsQuantizer at its
defaults (block 128) and at block 32, output size.

    python benchmarks/int4_process_time.py [--python PY_WITH_ONNXRUNTIME_QUANTIZATION]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def build(path: Path, d: int = 2048) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for b in range(6):
        for j in range(2):
            w = (rng.standard_normal((d, d)) * 0.02
                 * np.exp(rng.normal(0, 0.5, (1, d)))).astype(np.float32)
            name = f"b{b}.w{j}"
            inits.append(numpy_helper.from_array(w, name))
            nodes.append(helper.make_node("MatMul", [x, name], [name + "_o"]))
            x = name + "_o"
            if j == 0:
                nodes.append(helper.make_node("Tanh", [x], [x + "_t"]))
                x += "_t"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))


ORT = """
import sys
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
q = MatMulNBitsQuantizer(sys.argv[1], bits=4, block_size=int(sys.argv[3]))
q.process()
q.model.save_model_to_file(sys.argv[2], False)
"""


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if result.returncode:
        raise SystemExit(f"{cmd[:4]} failed: {result.stderr[-1500:]}")
    return time.perf_counter() - start


def main() -> None:
    peer_python = sys.argv[sys.argv.index("--python") + 1] if "--python" in sys.argv \
        else sys.executable
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "syn50m.onnx"
        build(src)
        runs = {
            "onnxruntime MatMulNBitsQuantizer (defaults: block 128)":
                ([peer_python, "-c", ORT, str(src), str(tmp / "ort128.onnx"), "128"], None,
                 "ort128.onnx"),
            "onnxruntime MatMulNBitsQuantizer block 32":
                ([peer_python, "-c", ORT, str(src), str(tmp / "ort32.onnx"), "32"], None,
                 "ort32.onnx"),
            "modelpress quantize --bits 4 (A16)":
                ([sys.executable, "-m", "cli", "compress", str(src), "-o", str(tmp / "mp.onnx"),
                  "--no-eval", "-q", "quantize", "--bits", "4"], REPO, "mp.onnx"),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(2):
            for label, (cmd, cwd, _) in runs.items():
                times[label].append(timed(cmd, cwd))
        base = min(times["onnxruntime MatMulNBitsQuantizer (defaults: block 128)"])
        base32 = min(times["onnxruntime MatMulNBitsQuantizer block 32"])
        print(f"source {src.stat().st_size / 2**20:.1f} MiB, nproc {os.cpu_count()}, "
              f"load {os.getloadavg()[0]:.1f}\n")
        print("| tool | best of 2 (s) | vs ORT defaults | vs ORT block 32 | output MiB |")
        print("|---|---|---|---|---|")
        for label, (_, _, out) in runs.items():
            best = min(times[label])
            print(f"| {label} | {best:.2f} | {best / base:.2f}x | {best / base32:.2f}x | "
                  f"{(tmp / out).stat().st_size / 2**20:.1f} |")


if __name__ == "__main__":
    main()
