"""Whole-process wall time of 4-bit ONNX quantization: modelpress against onnxruntime's quantizer.

Two models, written to a temporary folder:

- the benchmark's synthetic transformer (about 55M parameters, see
  peerbench/synth.py) with modelpress's 4-bit reference row of run.py
  (`quantize --bits 4 --all-layers`), against each of
  onnxruntime's MatMulNBitsQuantizer rows of run.py (block 32 sym, block 32
  asym, defaults); the ratio is to the fastest of them in the same round;
- a plain ~50M-parameter MatMul chain (12 matrices of 2048x2048, column scales
  log-normal) with `quantize --bits 4`, against the quantizer at its defaults
  (block 128) and at block 32.

Each tool runs in a fresh process (imports, load, quantize, save); the tools
of a model run one after the other in a round, and rounds repeat, so each
ratio compares runs made side by side. Prints Markdown tables: per-round
seconds, the ratio of each round and the median ratio, output size.

    python benchmarks/int4_process_time.py [--python PY_WITH_ONNXRUNTIME_QUANTIZATION]
        [--rounds N] [--only transformer|matmul]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REFERENCE = ["quantize", "--bits", "4", "--all-layers"]


def build(path: Path, d: int = 2048) -> None:
    """The MatMul chain: 6 blocks of two [d, d] weights with a Tanh between."""
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
import json, sys
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
q = MatMulNBitsQuantizer(sys.argv[1], **json.loads(sys.argv[3]))
q.process()
q.model.save_model_to_file(sys.argv[2], False)
"""


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if result.returncode:
        raise SystemExit(f"{cmd[:4]} failed: {result.stderr[-1500:]}")
    return time.perf_counter() - start


def rows_for(src: Path, tmp: Path, peer_python: str, ort_configs: dict[str, str],
             mp_args: list[str]) -> dict[str, tuple[list[str], Path | None, Path]]:
    """label -> (command, cwd, output) for each tool run on `src`."""
    rows = {}
    for i, (label, options) in enumerate(ort_configs.items()):
        out = tmp / f"{src.stem}.ort{i}.onnx"
        rows[label] = ([peer_python, "-c", ORT, str(src), str(out), options], None, out)
    out = tmp / f"{src.stem}.mp.onnx"
    rows["modelpress " + " ".join(mp_args)] = (
        [sys.executable, "-m", "modelpress", "compress", str(src), "-o", str(out), "--no-eval",
         "--quiet", *mp_args], REPO, out)
    return rows


def measure(title: str, rows: dict[str, tuple[list[str], Path | None, Path]],
            rounds: int) -> None:
    """Run every row once per round; print seconds and the ratios to the fastest ORT row."""
    times: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(rounds):
        for label, (cmd, cwd, _) in rows.items():
            times[label].append(timed(cmd, cwd))
    peers = [label for label in rows if label.startswith("onnxruntime")]
    fastest = [min(times[p][r] for p in peers) for r in range(rounds)]
    print(f"\n### {title}\n")
    print("| tool | seconds per round | median | median ratio to fastest ORT "
          "(per round) | output MiB |")
    print("|---|---|---|---|---|")
    for label, (_, _, out) in rows.items():
        ratios = [t / f for t, f in zip(times[label], fastest)]
        print(f"| {label} | {' '.join(f'{t:.2f}' for t in times[label])} | "
              f"{statistics.median(times[label]):.2f} | {statistics.median(ratios):.2f}x "
              f"({' '.join(f'{r:.2f}' for r in ratios)}) | {out.stat().st_size / 2**20:.1f} |")


def main() -> None:
    argv = sys.argv[1:]
    peer_python = argv[argv.index("--python") + 1] if "--python" in argv else sys.executable
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 3
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"nproc {os.cpu_count()}, load {os.getloadavg()[0]:.1f} at the start; "
              f"{rounds} rounds")
        if only in (None, "transformer"):
            from benchmarks.peerbench import synth
            src, _ = synth.build(tmp / "synthetic")
            ort = {"onnxruntime MatMulNBits block 32 sym":
                   '{"bits": 4, "block_size": 32, "is_symmetric": true}',
                   "onnxruntime MatMulNBits block 32 asym": '{"bits": 4, "block_size": 32}',
                   "onnxruntime MatMulNBits defaults (block 128 asym)": '{"bits": 4}'}
            measure(f"synthetic transformer ({src.stat().st_size / 2**20:.0f} MiB)",
                    rows_for(src, tmp, peer_python, ort, REFERENCE), rounds)
        if only in (None, "matmul"):
            src = tmp / "syn50m.onnx"
            build(src)
            ort = {"onnxruntime MatMulNBits defaults (block 128)": '{"bits": 4}',
                   "onnxruntime MatMulNBits block 32": '{"bits": 4, "block_size": 32}'}
            measure(f"MatMul chain ({src.stat().st_size / 2**20:.0f} MiB)",
                    rows_for(src, tmp, peer_python, ort, ["quantize", "--bits", "4"]), rounds)


if __name__ == "__main__":
    main()
