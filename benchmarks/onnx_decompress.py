"""ONNX decompress against compress on the same model: wall time and peak memory.

Builds an inline (no external data) fp32 ONNX model of many square MatMuls,
like a small transformer encoder exported whole (default 96 weights of
[512, 512], 100 MB), compresses it to int4 with the defaults, then
decompresses the output. Each step runs in its own process; prints a Markdown
table with the wall time and peak resident memory (VmHWM) of each, and the
ratios decompress / compress against issue 16's bounds (time 1.5x, memory 2x).

    python benchmarks/onnx_decompress.py [--layers 96] [--width 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import MIB, cli, measure, save_chain  # noqa: E402


def build_inline(path: Path, layers: int, width: int) -> None:
    """x[4, width] -> `layers` MatMuls with [width, width] fp32 weights stored in the model."""
    from onnx import numpy_helper
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(
        (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}")
        for i in range(layers)]
    save_chain(path, inits, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, small, dense = (Path(tmp) / n for n in ("m.onnx", "int4.onnx", "dense.onnx"))
        build_inline(src, args.layers, args.width)
        compress = measure(cli("compress", src, "-o", small, "-q", "--no-eval",
                               "quantize", "--bits", "4"))
        decompress = measure(cli("decompress", small, "-o", dense))
        print(f"### ONNX decompress: {args.layers} MatMuls [{args.width}, {args.width}] fp32 "
              f"inline, {src.stat().st_size / 1e6:.0f} MB; "
              f"int4 {small.stat().st_size / 1e6:.1f} MB\n")
        print("| step | wall s | peak RSS MiB |")
        print("|---|---:|---:|")
        for label, run in (("compress int4", compress), ("decompress", decompress)):
            print(f"| {label} | {run.seconds:.2f} | {run.peak / MIB:,.0f} |")
        print(f"| decompress / compress | {decompress.seconds / compress.seconds:.2f}x "
              f"(bound 1.5x) | {decompress.peak / compress.peak:.2f}x (bound 2x) |")


if __name__ == "__main__":
    main()
