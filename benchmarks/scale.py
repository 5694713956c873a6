"""Scale: a checkpoint of several GiB and an ONNX model over 2 GB, against `cp` of the same file.

Builds, in a temporary folder (streamed to disk, never whole in memory):

* a safetensors checkpoint shaped like a 7B-class decoder (hidden 4096,
  MLP 11008, vocabulary 32000; as many layers as fit --size-gib), and
* an ONNX model over 2 GB: a chain of square MatMuls whose weights are
  external data.

Then, each in its own process: `cp` of the checkpoint (and `cp` followed by
an fsync of the copy, since modelpress fsyncs what it writes), `modelpress
compress` to int8 (per channel, rtn) and to int4 (group 128, the default
mse), and for the ONNX model compress (with --no-eval: the built-in
evaluation would load the original in onnxruntime) plus one run of the
output in onnxruntime. Prints Markdown tables: wall time as a ratio to cp,
peak resident memory (VmHWM of the measured process itself) against the
target "4 x largest tensor + 300 MiB", and for ONNX the peak of compress and
of the onnxruntime run against 2 GiB.

    python benchmarks/scale.py [--quick] [--size-gib 4] [--dtype bf16|f32] [--threads N]

--quick runs the same steps on a ~100 MB checkpoint and a ~100 MB ONNX
model (a smoke run; it says nothing about scale). Files go to $TMPDIR
(default /tmp) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
GIB = 2**30
CHUNK = 1 << 22  # elements generated and written at a time

# Reports the process's own peak resident memory at exit (VmHWM: counted from
# exec, so nothing of the parent's).
_PEAK = """
import atexit, sys
def _peak():
    with open("/proc/self/status") as fh:
        line = next(l for l in fh if l.startswith("VmHWM:"))
    sys.stderr.write("\\nPEAK_KIB " + line.split()[1] + "\\n")
atexit.register(_peak)
"""
# Runs the modelpress CLI in this process.
_CLI = _PEAK + """
from modelpress.cli.entry import main
sys.argv = ["modelpress"] + sys.argv[1:]
main()
"""

# Runs an ONNX model once in onnxruntime (default session options) on a fixed
# input; saves the output and reports the peak like _CLI.
_ORT = _PEAK + """
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((4, int(sys.argv[3]))).astype(np.float32)
np.save(sys.argv[2], session.run(None, {"x": x})[0])
"""

# ---------------------------------------------------------------------------- building


def decoder_layout(size_bytes: int, itemsize: int, hidden: int, mlp: int,
                   vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a decoder with as many layers as fit `size_bytes`."""
    per_layer = (4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden) * itemsize
    fixed = (2 * vocab * hidden + hidden) * itemsize
    layers = max(1, -(-(size_bytes - fixed) // per_layer))  # at least size_bytes
    names: list[tuple[str, tuple[int, ...]]] = [("lm_head.weight", (vocab, hidden)),
                                                ("model.embed_tokens.weight", (vocab, hidden)),
                                                ("model.norm.weight", (hidden,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (hidden,)),
                  (p + "mlp.down_proj.weight", (hidden, mlp)),
                  (p + "mlp.gate_proj.weight", (mlp, hidden)),
                  (p + "mlp.up_proj.weight", (mlp, hidden)),
                  (p + "post_attention_layernorm.weight", (hidden,))]
        names += [(p + f"self_attn.{w}_proj.weight", (hidden, hidden)) for w in "kvoq"]
    return names


def _write_random(out, count: int, dtype: np.dtype, rng: np.random.Generator,
                  std: float) -> None:
    """`count` normal values of `dtype`, generated and written in chunks."""
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        out.write((rng.standard_normal(n, dtype=np.float32) * np.float32(std))
                  .astype(dtype).tobytes())


def build_safetensors(path: Path, layout: list[tuple[str, tuple[int, ...]]],
                      dtype_name: str) -> None:
    """Write a safetensors file tensor by tensor (header first, then each tensor in chunks)."""
    import ml_dtypes
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bf16" else np.dtype(np.float32)
    code = "BF16" if dtype_name == "bf16" else "F32"
    header: dict[str, object] = {}
    offset = 0
    for name, shape in layout:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset,
                                                                             offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name, shape in layout:
            _write_random(out, int(np.prod(shape)), dtype, rng, 0.02)


def build_onnx(path: Path, layers: int, width: int) -> None:
    """x[4, width] -> `layers` MatMuls with [width, width] fp32 weights in `path`.data."""
    from onnx import TensorProto
    data_name = path.name + ".weights"
    rng = np.random.default_rng(1)
    inits, offset = [], 0
    nbytes = width * width * 4
    with open(path.parent / data_name, "wb") as out:
        for i in range(layers):
            _write_random(out, width * width, np.dtype(np.float32), rng, 1 / np.sqrt(width))
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(nbytes))):
                tensor.external_data.add(key=key, value=value)
            offset += nbytes
            inits.append(tensor)
    save_chain(path, inits, width)


def save_chain(path: Path, weights: list, width: int) -> None:
    """Save x[4, width] -> one MatMul per initializer of `weights` (named w0, w1, ...)."""
    import onnx
    from onnx import TensorProto, helper
    nodes, current = [], "x"
    for i in range(len(weights)):
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [4, width])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save_model(model, str(path))


# ---------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One measured process."""

    seconds: float
    peak: int | None  # bytes; None when the process does not report it (cp)


def measure(argv: list[str]) -> Run:
    """Run a process to completion; its wall time and (if it reports it) peak memory."""
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, argv))}\n"
                         f"{done.stderr[-2000:]}")
    peaks = [int(line.split()[1]) * 1024 for line in done.stderr.splitlines()
             if line.startswith("PEAK_KIB ")]
    return Run(seconds, peaks[-1] if peaks else None)


def cli(*args: object) -> list[str]:
    return [sys.executable, "-c", _CLI, *map(str, args)]


def drop(*paths: Path) -> None:
    """Delete outputs between runs (and their data files), so disk use stays bounded;
    flush what is still being written back, so it does not slow the next run."""
    for p in paths:
        for f in [p, Path(f"{p}.data")]:
            if f.exists():
                f.unlink()
    os.sync()


def best_of(argv: list[str], repeat: int, after: list[Path]) -> Run:
    """The fastest of `repeat` runs (the peak is the largest seen)."""
    runs = []
    for _ in range(repeat):
        runs.append(measure(argv))
        drop(*after)
    peaks = [r.peak for r in runs if r.peak is not None]
    return Run(min(r.seconds for r in runs), max(peaks) if peaks else None)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f}"


# ---------------------------------------------------------------------------- the runs


def safetensors_table(tmp: Path, args: argparse.Namespace) -> None:
    itemsize = 2 if args.dtype == "bf16" else 4
    if args.quick:
        layout = decoder_layout(100 * 10**6, itemsize, 512, 1376, 4000)
    else:
        layout = decoder_layout(int(args.size_gib * GIB), itemsize, 4096, 11008, 32000)
    src = tmp / "model.safetensors"
    start = time.perf_counter()
    build_safetensors(src, layout, args.dtype)
    built = time.perf_counter() - start
    size = src.stat().st_size
    largest = max(int(np.prod(s)) for _, s in layout) * itemsize
    bound = 4 * largest + 300 * MIB
    os.sync()  # the build's dirty pages would otherwise be written back during the timings
    copy = tmp / "copy.safetensors"
    # cp is timed twice (the fastest kept) however often the others run: its time
    # varies most with the page cache and write-back.
    cp = best_of(["cp", src, copy], max(2, args.repeat), [copy])
    cp_sync = best_of(["sh", "-c", f"cp '{src}' '{copy}' && sync '{copy}'"],
                      max(2, args.repeat), [copy])
    print(f"### safetensors: {size / GIB:.2f} GiB {args.dtype}, {len(layout)} tensors, "
          f"largest {largest / MIB:,.0f} MiB (built in {built:.0f} s)\n")
    print(f"cp: {cp.seconds:.2f} s; cp + fsync of the copy: {cp_sync.seconds:.2f} s; "
          f"--threads {args.threads or 'default (CPU count)'}\n")
    print("| run | wall s | / cp | / (cp + fsync) | peak RSS MiB | 4 x largest + 300 MiB "
          "| within |")
    print("|---|---:|---:|---:|---:|---:|---|")
    threads = ["--threads", args.threads] if args.threads else []
    for label, stage in (("int8 channel rtn", ["quantize", "--bits", "8", "--granularity",
                                               "channel", "--method", "rtn"]),
                         ("int4 g128 (mse)", ["quantize", "--bits", "4"])):
        out = tmp / "out.safetensors"
        run = best_of(cli("compress", src, "-o", out, "-q", *threads, *stage), args.repeat, [out])
        print(f"| {label} | {run.seconds:.2f} | {run.seconds / cp.seconds:.2f} | "
              f"{run.seconds / cp_sync.seconds:.2f} | {mib(run.peak)} | {mib(bound)} | "
              f"{'yes' if run.peak is not None and run.peak <= bound else 'NO'} |")
    drop(src)
    print()


def onnx_table(tmp: Path, args: argparse.Namespace) -> None:
    width, layers = (1024, 24) if args.quick else (4096, args.onnx_layers)
    src = tmp / "chain.onnx"
    build_onnx(src, layers, width)
    size = src.stat().st_size + (tmp / "chain.onnx.weights").stat().st_size
    print(f"### ONNX: {layers} MatMuls [{width}, {width}] fp32, {size / 1e9:.2f} GB "
          f"(external data), largest tensor {width * width * 4 / MIB:,.0f} MiB\n")
    reference = tmp / "reference.npy"
    base = measure([sys.executable, "-c", _ORT, src, reference, width])
    print("| run | wall s | peak RSS MiB | under 2 GiB | output files MB | rel. L2 error |")
    print("|---|---:|---:|---|---:|---:|")
    print(f"| original in onnxruntime | {base.seconds:.2f} | {mib(base.peak)} | "
          f"{'yes' if base.peak < 2 * GIB else 'no'} | {size / 1e6:,.0f} | - |")
    threads = ["--threads", args.threads] if args.threads else []
    ref = np.load(reference)
    for label, stage in (("int8", ["quantize", "--bits", "8"]),
                         ("int4", ["quantize", "--bits", "4"])):
        out = tmp / "out.onnx"
        run = measure(cli("compress", src, "-o", out, "-q", "--no-eval", *threads, *stage))
        files = out.stat().st_size + (Path(f"{out}.data").stat().st_size
                                      if Path(f"{out}.data").exists() else 0)
        got = tmp / "got.npy"
        ran = measure([sys.executable, "-c", _ORT, out, got, width])
        y = np.load(got)
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        for what, r in ((f"compress {label}", run), (f"{label} output in onnxruntime", ran)):
            print(f"| {what} | {r.seconds:.2f} | {mib(r.peak)} | "
                  f"{'yes' if r.peak < 2 * GIB else 'NO'} | {files / 1e6:,.0f} | "
                  f"{err:.2e} |")
        drop(out, got)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--size-gib", type=float, default=4.0, help="checkpoint size")
    parser.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    parser.add_argument("--onnx-layers", type=int, default=36,
                        help="MatMuls [4096, 4096] fp32 in the ONNX model (36: 2.4 GB)")
    parser.add_argument("--threads", type=int, help="modelpress --threads")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (fastest kept)")
    parser.add_argument("--only", choices=("safetensors", "onnx"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelpress-scale-") as folder:
        tmp = Path(folder)
        print(f"{platform.platform()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
              f"{' (--quick)' if args.quick else ''}\n")
        if args.only != "onnx":
            safetensors_table(tmp, args)
        if args.only != "safetensors":
            onnx_table(tmp, args)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
