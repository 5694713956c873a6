"""Batch on a Dask LocalCluster against the local pool: wall time, peak memory per worker.

Builds a tree of M models of about S MB each (half safetensors files, half ONNX
MatMul chains, float32 weights of 2048x2048), then runs

    python -m modelpress compress TREE -o OUT --jobs 2 --quiet quantize --bits B
    python -m modelpress compress TREE -o OUT --jobs 2 --executor dask --quiet quantize --bits B

(the second starts a LocalCluster of 2 worker processes, one model at a time
each, and stops it; both times include that). While each runs, the resident
memory of every process of the command is sampled every 0.1 s. Prints a
Markdown table: wall time, ratio, the peak resident memory of each process
(the command's own process, and each worker), then the per-model time each
worker saw and what N machines would take from it. Outputs must be
byte-identical; the script exits 1 if not.

    python benchmarks/dask_batch.py [--models 24] [--size-mb 100] [--bits 8]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 2048


def build_tree(root: Path, models: int, size_mb: float) -> int:
    """`models` models of about `size_mb` MB under root; returns their total bytes."""
    layers = max(1, round(size_mb * 1e6 / (WIDTH * WIDTH * 4)))
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((WIDTH, WIDTH)) / math.sqrt(WIDTH)).astype(np.float32)
               for _ in range(layers)]
    st = root / "src.safetensors"
    save_file({f"layers.{i}.weight": w for i, w in enumerate(weights)}, str(st), {"format": "pt"})
    nodes, current = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, WIDTH])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    on = root / "src.onnx"
    onnx.save(model, str(on))
    tree = root / "tree"
    for i in range(models):
        src, suffix = (st, "safetensors") if i % 2 == 0 else (on, "onnx")
        dst = tree / f"group{i % 4}" / f"m{i:02d}.{suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    st.unlink()
    on.unlink()
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())


class PeakMemory:
    """Peak resident memory of a process and each of its descendants, sampled."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}       # user + system seconds, last seen
        self.names: dict[int, str] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                    if proc.pid not in self.names:
                        self.names[proc.pid] = _role(proc, self.root)
                except psutil.Error:
                    continue
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            self.done.wait(0.1)

    def stop(self) -> tuple[dict[str, list[int]], float]:
        """Peaks by role ("command", "worker", ...), largest first; CPU seconds of them all
        (as last sampled: a process's final 0.1 s may be missed)."""
        self.done.set()
        self.thread.join()
        roles: dict[str, list[int]] = {}
        for pid, peak in self.peaks.items():
            roles.setdefault(self.names.get(pid, "?"), []).append(peak)
        return {role: sorted(v, reverse=True) for role, v in roles.items()}, sum(self.cpu.values())


def _role(proc: psutil.Process, root: psutil.Process) -> str:
    if proc.pid == root.pid:
        return "command"
    cmd = " ".join(proc.cmdline())
    if "resource_tracker" in cmd:
        return "helper"
    # Dask: the nanny runs in the command's process; its worker is a spawned child.
    # The local pool's workers are spawned children too.
    return "worker" if "spawn_main" in cmd or "multiprocessing" in cmd else "other"


def run(tree: Path, out: Path, bits: int,
        extra: list[str]) -> tuple[float, dict[str, list[int]], float]:
    """Wall time, memory peaks and CPU seconds of one batch command."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", "compress", str(tree), "-o",
                             str(out), "--jobs", "2", "--quiet", *extra, "quantize", "--bits",
                             str(bits)], cwd=ROOT)
    peaks = PeakMemory(proc.pid)
    code = proc.wait()
    wall = time.perf_counter() - start
    memory, cpu = peaks.stop()
    if code != 0:
        sys.exit(f"{' '.join(extra) or 'local'} run failed (exit {code})")
    return wall, memory, cpu


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _mb(values: list[int]) -> str:
    return ", ".join(f"{v / 2**20:,.0f}" for v in values) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=24)
    parser.add_argument("--size-mb", type=float, default=100)
    parser.add_argument("--bits", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        total = build_tree(Path(tmp), args.models, args.size_mb)
        tree = Path(tmp) / "tree"
        load = os.getloadavg()[0]
        results = {}
        for name, extra in (("local --jobs 2", []), ("dask LocalCluster, 2 workers",
                                                     ["--executor", "dask"])):
            out = Path(tmp) / name.split()[0]
            results[name] = run(tree, out, args.bits, extra)
        # The cluster's start and stop alone: the same command on one small model.
        small = Path(tmp) / "small"
        small.mkdir()
        shutil.copy(ROOT / "sample_models" / "mlp.onnx", small / "mlp.onnx")
        overhead_dask, _, cpu_dask = run(small, Path(tmp) / "small-dask", args.bits,
                                         ["--executor", "dask"])
        overhead_local, _, cpu_local = run(small, Path(tmp) / "small-local", args.bits, [])
        identical = files(Path(tmp) / "local") == files(Path(tmp) / "dask")
    print(f"{args.models} models ({args.models // 2 + args.models % 2} safetensors, "
          f"{args.models // 2} ONNX), {total / 1e9:.2f} GB in total, quantize --bits "
          f"{args.bits}; {os.cpu_count()} CPUs, load average {load:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after\n")
    base = results["local --jobs 2"][0]
    print("| executor | wall time (s) | vs local | CPU time (s) | peak RSS, command (MiB) "
          "| peak RSS per worker process (MiB) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, (wall, memory, cpu) in results.items():
        print(f"| {name} | {wall:.1f} | {wall / base:.2f}x | {cpu:.1f} "
              f"| {_mb(memory.get('command', []))} | {_mb(memory.get('worker', []))} |")
    dask_wall = results["dask LocalCluster, 2 workers"][0]
    per_model = max(0.0, dask_wall - overhead_dask) * 2 / args.models
    print(f"\nstart-up and shutdown of the command on one small model: {overhead_dask:.1f} s with "
          f"dask (the cluster included; {cpu_dask:.1f} s of CPU), {overhead_local:.1f} s local "
          f"({cpu_local:.1f} s of CPU)")
    print(f"per-model time on a worker (dask run less that, x 2 workers / {args.models} "
          f"models): {per_model:.2f} s")
    print("expected wall time on N machines of 2 workers each (start-up + models / (2 N) x "
          "per-model time; storage bandwidth not counted):")
    for machines in (1, 2, 4, 8, 16):
        expect = overhead_dask + math.ceil(args.models / (2 * machines)) * per_model
        print(f"- {machines} machines: {expect:.1f} s")
    print(f"\noutputs byte-identical between the executors: {'yes' if identical else 'NO'}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
