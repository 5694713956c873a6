"""Batch compression with --jobs 1 and --jobs N: wall time ratio and byte-identical outputs.

Builds a tree of eight sample-size models (the three sample ONNX models, the
three sample safetensors files, the sample transformer as a 3-shard
checkpoint, and as ONNX with external data), then runs

    python -m modelpress compress TREE -o OUT --jobs J --quiet quantize --bits 4

for J = 1 and J = N, alternating, several times, and prints a Markdown table
of median wall times (the whole command, interpreter start included) and
their ratio, then checks that both runs wrote byte-identical files. The
machine's load average and the CPU capacity N busy processes get right now
(a pure-Python busy loop run alone and N times in parallel) are printed too:
when other processes hold the CPUs, no parallel run can be faster.

    python benchmarks/batch_jobs.py [--repeat 5] [--jobs 2] [--scale 1,4]

--scale K,... prints one table per scale; K > 1 makes larger models: every safetensors tensor is tiled K
times along its first axis, and each ONNX model becomes a chain of MatMul
layers of width 128*K (K=1, the default, uses the sample models as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def build_tree(root: Path, scale: int) -> int:
    """Eight models under root; returns their total bytes."""
    for name in ("mlp", "cnn", "transformer"):
        _copy_onnx(SAMPLES / f"{name}.onnx", root / "onnx" / f"{name}.onnx", scale)
        _copy_safetensors(SAMPLES / f"{name}.safetensors", root / "st" / f"{name}.safetensors",
                          scale)
    tensors = _tensors(SAMPLES / "transformer.safetensors", scale)
    names, folder, weight_map = list(tensors), root / "llm", {}
    folder.mkdir(parents=True)
    for i in range(3):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in names[i::3]}, str(folder / file), {"format": "pt"})
        weight_map.update({n: file for n in names[i::3]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    ext = root / "ext" / "transformer.onnx"
    _copy_onnx(SAMPLES / "transformer.onnx", ext, scale)
    model = onnx.load(str(ext))
    onnx.save_model(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="transformer.onnx.data", size_threshold=0)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _tile(array: np.ndarray, scale: int) -> np.ndarray:
    return array if scale == 1 or array.ndim < 2 else np.concatenate([array] * scale, axis=0)


def _tensors(path: Path, scale: int) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="np") as f:
        return {k: _tile(f.get_tensor(k), scale) for k in f.keys()}


def _copy_safetensors(src: Path, dst: Path, scale: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(src, scale), str(dst), {"format": "pt"})


_LAYERS = {"mlp": 3, "cnn": 2, "transformer": 6}


def _copy_onnx(src: Path, dst: Path, scale: int) -> None:
    """Copy a sample ONNX model, or with scale > 1 write a MatMul chain of width 128*scale."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if scale == 1:
        shutil.copy(src, dst)
        return
    width, layers = 128 * scale, _LAYERS[src.stem]
    rng = np.random.default_rng(layers)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        weight = rng.standard_normal((width, width)).astype(np.float32) / np.sqrt(width)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    graph = helper.make_graph(
        nodes, src.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(dst))


def run(tree: Path, out: Path, jobs: int) -> float:
    """Wall time of one batch command."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modelpress", "compress", str(tree), "-o", str(out), "--jobs",
                    str(jobs), "--quiet", "quantize", "--bits", "4"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def measure(scale: int, repeat: int, jobs_n: int) -> bool:
    """Print one table for one model size; True if the outputs were byte-identical."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        total = build_tree(tree, scale)
        load_before = os.getloadavg()
        times: dict[int, list[float]] = {1: [], jobs_n: []}
        for r in range(repeat):
            for jobs in (1, jobs_n) if r % 2 == 0 else (jobs_n, 1):
                out = Path(tmp) / f"out-{jobs}"
                shutil.rmtree(out, ignore_errors=True)
                times[jobs].append(run(tree, out, jobs))
        load_after = os.getloadavg()
        one, many = files(Path(tmp) / "out-1"), files(Path(tmp) / f"out-{jobs_n}")
    base = statistics.median(times[1])
    print(f"8 models, {total / 1e6:.2f} MB in total (scale {scale}), quantize --bits 4, "
          f"{repeat} runs each, {os.cpu_count()} CPUs, load average {load_before[0]:.2f} "
          f"before / {load_after[0]:.2f} after\n")
    print("| --jobs | median wall time (s) | fastest (s) | time vs --jobs 1 |")
    print("|---:|---:|---:|---:|")
    for jobs, values in times.items():
        median = statistics.median(values)
        print(f"| {jobs} | {median:.2f} | {min(values):.2f} | {median / base:.2f}x |")
    print(f"\noutputs byte-identical between --jobs 1 and --jobs {jobs_n}: "
          f"{'yes' if one == many else 'NO'} ({len(one)} files)\n")
    return one == many


def _spin(n: int) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return time.perf_counter() - start


def capacity(jobs: int) -> float:
    """How many CPUs `jobs` busy processes get right now: `jobs` x the time of one busy
    loop alone over the wall time of `jobs` such loops in parallel (`jobs` at best)."""
    import multiprocessing
    n = 10_000_000
    alone = _spin(n)
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        pool.map(_spin, [10] * jobs)
        start = time.perf_counter()
        pool.map(_spin, [n] * jobs)
        together = time.perf_counter() - start
    return jobs * alone / together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scale", default="1,4",
                        help="comma-separated model scales, one table each [default: 1,4]")
    args = parser.parse_args()
    # Other processes on the machine decide how much parallel work can gain; say so first.
    print(f"CPU capacity now: {args.jobs} busy processes get {capacity(args.jobs):.2f} CPUs "
          f"({args.jobs} on an idle machine)\n")
    identical = [measure(int(k), args.repeat, args.jobs) for k in args.scale.split(",")]
    print(f"CPU capacity after: {capacity(args.jobs):.2f} CPUs for {args.jobs} busy processes")
    if not all(identical):
        sys.exit(1)


if __name__ == "__main__":
    main()
