"""Peak memory of one compress job against the rule that bounds the default --jobs.

Builds a safetensors file and an ONNX model of about SIZE MB of fp32 weights
(square 1024x1024 layers), compresses each at 8 and 4 bits in a fresh
process, and prints a Markdown table of the measured peak resident memory
(ru_maxrss) next to `modelpress.app.batch.plan.memory_need`, the estimate the
default --jobs divides the available memory by.

    python benchmarks/job_memory.py [--size 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelpress.app.batch.plan import memory_need  # noqa: E402
from modelpress.app.batch.worker import Task  # noqa: E402

_MEASURE = """
import resource, sys
from compress_core import Quantize, Recipe, compress
compress(sys.argv[1], sys.argv[2], Recipe([Quantize(bits=int(sys.argv[3]))]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def build(folder: Path, layers: int) -> None:
    """A safetensors file and an ONNX MatMul chain with `layers` 1024x1024 fp32 weights."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((1024, 1024)).astype(np.float32) for _ in range(layers)]
    st = folder / "model.safetensors"
    save_file({f"l{i}.weight": w for i, w in enumerate(weights)}, str(st))
    nodes, inits, current = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT,
                                                             [1, 1024])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))


def peak(src: Path, dst: Path, bits: int) -> int:
    """Peak resident bytes of a fresh process compressing src."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(dst), str(bits)],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100, help="MB of weights per model")
    parser.add_argument("--build-into", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = max(1, round(args.size * 1e6 / (1024 * 1024 * 4)))
    if args.build_into:
        build(Path(args.build_into), layers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        # Built in another process: Linux carries a parent's peak memory into the
        # ru_maxrss of the children it starts, which would inflate the measurements.
        subprocess.run([sys.executable, __file__, "--size", str(args.size), "--build-into", tmp],
                       check=True)
        models = {"safetensors": Path(tmp) / "model.safetensors",
                  "onnx": Path(tmp) / "model.onnx"}
        print(f"{layers} layers of 1024x1024 fp32 per model\n")
        print("| format | model MB | bits | measured peak MB | rule's estimate MB | "
              "estimate / peak |")
        print("|---|---:|---:|---:|---:|---:|")
        for kind, src in models.items():
            size = src.stat().st_size
            need = memory_need(Task("m", kind, src, src, src.parent, nbytes=size))
            for bits in (8, 4):
                measured = peak(src, Path(tmp) / f"out{bits}{src.suffix}", bits)
                print(f"| {kind} | {size / 1e6:.0f} | {bits} | {measured / 1e6:.0f} | "
                      f"{need / 1e6:.0f} | {need / measured:.2f} |")


if __name__ == "__main__":
    main()
