"""What the fuzzer runs on one input, and the seed inputs (mutations.py mutates them).

An input is one format byte (even: .onnx, odd: .safetensors) followed by the
file's bytes. `run_one` writes it beside a fixed external data file
(`data.bin`), then reads it the way every command does (open_model, read
every tensor, inspect and its table, decompress), compresses it with one of a few small
recipes and reads back what was written (inspect, decompress). A
ModelpressError anywhere before the output exists is the expected refusal;
anything else is a finding: another exception (a traceback for the user), an
unreadable output of our own, a partial output, a temporary file left
behind, or a changed input.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import signal
import traceback
import zlib
from pathlib import Path
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelpress import (REGISTRY, ModelpressError, Options, Prune, Quantize, Recipe, compress, decompress, inspect)
from modelpress.formats import open_model

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_models"
SUFFIXES = (".onnx", ".safetensors")
SIDE_FILE = "data.bin"
SIDE_BYTES = np.random.default_rng(5).standard_normal(64 * 64).astype(np.float32).tobytes()
SECONDS_PER_INPUT = 60


def recipes() -> list[Recipe]:
    """The small recipes inputs are compressed with (chosen by a checksum of the input)."""
    chosen = [Recipe([Quantize(bits=8)]), Recipe([Quantize(bits=4, group_size=16)]),
              Recipe([Prune(sparsity=0.5), Quantize(bits=8)]),
              Recipe([Quantize(bits=3, scheme="asym", group_size=8)]), Recipe([Prune(sparsity=0.7)])]
    for stage, options in (("cluster", {}), ("cast", {}), ("lowrank", {"rank_ratio": 0.25})):
        if stage in REGISTRY:  # issue 3's stages
            chosen.append(Recipe([REGISTRY[stage](**options)]))
    return chosen


def pack(suffix: str, body: bytes) -> bytes:
    return bytes([SUFFIXES.index(suffix)]) + body


def unpack(data: bytes) -> tuple[str, bytes]:
    if not data:
        return SUFFIXES[0], b""
    return SUFFIXES[data[0] % 2], data[1:]


class Timeout(Exception):
    """An input took longer than SECONDS_PER_INPUT."""


def _alarm(signum, frame):
    raise Timeout(f"no result after {SECONDS_PER_INPUT} s")


def run_one(data: bytes, work: Path) -> str | None:
    """Run one input; None if every step behaved, else a description of the finding."""
    suffix, body = unpack(data)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / SIDE_FILE).write_bytes(SIDE_BYTES)
    src = work / f"model{suffix}"
    src.write_bytes(body)
    recipe = recipes()[zlib.crc32(body) % len(recipes())]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_INPUT)
    try:
        _read_and_show(src)
        _compress_and_read_back(src, work, recipe)
        if (work / SIDE_FILE).read_bytes() != SIDE_BYTES or src.read_bytes() != body:
            return "the input was modified"
        left = [p.name for p in work.iterdir() if p.name.endswith(".modelpress-tmp")]
        if left:
            return f"temporary files left behind: {left}"
        return None
    except Finding as exc:
        return str(exc)
    except (Exception, Timeout) as exc:  # a traceback the user would see
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Finding(Exception):
    """A misbehaviour that is not an exception: partial or unreadable output."""


def _read_and_show(src: Path) -> None:
    """What inspect and decompress do with the input."""
    from rich.console import Console

    from modelpress.cli.render import print_inspect
    try:
        store = open_model(src)
        for name in store.tensors:
            store.read(name)
        report = inspect(src)
    except ModelpressError:
        return
    print_inspect(Console(file=io.StringIO(), width=120), report, "table")
    restored = src.with_name(f"restored{src.suffix}")
    try:
        decompress(src, restored)
    except ModelpressError:
        if restored.exists():
            raise Finding("decompress failed but left an output file") from None
        return
    try:
        open_model(restored)
    except ModelpressError as exc:
        raise Finding(f"modelpress cannot read back what decompress wrote: {exc}") from None


def _compress_and_read_back(src: Path, work: Path, recipe: Recipe) -> None:
    from rich.console import Console

    from modelpress.cli.render import print_report
    out, dense = work / f"out{src.suffix}", work / f"dense{src.suffix}"
    try:
        report = compress(src, out, recipe, Options(min_elements=1))
    except ModelpressError:
        if out.exists():
            raise Finding("compress failed but left an output file") from None
        return
    for fmt in ("table", "markdown", "json"):
        print_report(Console(file=io.StringIO(), width=120), report, fmt)
    try:
        store = open_model(out)
        for name in store.tensors:
            store.read(name)
        inspect(out)
        decompress(out, dense)
        restored = open_model(dense)
    except ModelpressError as exc:
        raise Finding(f"modelpress cannot read back its own output: {exc}") from None
    if set(restored.tensors) != set(open_model(src).tensors):
        raise Finding("decompressed output does not have the input's tensors")


# -- seeds -----------------------------------------------------------------------


def _st(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.numpy import save
    return save(tensors, metadata=metadata)


def _onnx(nodes, inits, inputs, outputs, opset: int = 17) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def _vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _w(*shape: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _small_onnx() -> list[bytes]:
    f = TensorProto.FLOAT
    matmul = _onnx([helper.make_node("MatMul", ["x", "w"], ["h"]),
                    helper.make_node("Gemm", ["h", "g", "b"], ["y"], transB=1)],
                   [numpy_helper.from_array(_w(32, 48), "w"), numpy_helper.from_array(_w(16, 48), "g"),
                    numpy_helper.from_array(_w(16), "b")], [_vi("x", f, ["n", 32])],
                   [_vi("y", f, ["n", 16])])
    conv = _onnx([helper.make_node("Conv", ["x", "k"], ["y"], pads=[1, 1, 1, 1])],
                 [numpy_helper.from_array(_w(8, 4, 3, 3), "k")], [_vi("x", f, [1, 4, 8, 8])],
                 [_vi("y", f, [1, 8, 8, 8])])
    gather = _onnx([helper.make_node("Gather", ["e", "i"], ["y"]),
                    helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(_w(8, 8), "c")),
                    helper.make_node("MatMul", ["y", "c"], ["z"])],
                   [numpy_helper.from_array(_w(20, 8), "e")], [_vi("i", TensorProto.INT64, [3])],
                   [_vi("z", f, [3, 8])])
    half = _onnx([helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [numpy_helper.from_array(_w(16, 16, dtype=np.float16), "w")],
                 [_vi("x", TensorProto.FLOAT16, ["n", 16])], [_vi("y", TensorProto.FLOAT16, ["n", 16])],
                 opset=21)
    ext = onnx.load_from_string(_onnx(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(_w(64, 64), "w")],
        [_vi("x", f, ["n", 64])], [_vi("y", f, ["n", 64])]))
    tensor = ext.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", SIDE_FILE), ("offset", "0"), ("length", str(len(SIDE_BYTES)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return [matmul, conv, gather, half, ext.SerializeToString()]


def _small_safetensors() -> list[bytes]:
    import ml_dtypes
    return [
        _st({"fc.weight": _w(24, 40), "fc.bias": _w(24), "ids": np.arange(12, dtype=np.int64)},
            {"format": "pt"}),
        _st({"a.weight": _w(16, 32, dtype=np.float16), "b.weight": _w(8, 3, 3, 3),
             "c.weight": _w(16, 16, dtype=ml_dtypes.bfloat16), "flag": np.ones(3, bool),
             "s": np.array(1.5, np.float32)}),
    ]


def _compressed(suffix: str, body: bytes, recipe: Recipe, tmp: Path) -> bytes:
    tmp.mkdir(parents=True, exist_ok=True)
    src, out = tmp / f"s{suffix}", tmp / f"o{suffix}"
    src.write_bytes(body)
    (tmp / SIDE_FILE).write_bytes(SIDE_BYTES)
    compress(src, out, recipe, Options(min_elements=1))
    return out.read_bytes()


def seeds(tmp: Path, include_samples: bool = True) -> list[bytes]:
    """Seed inputs: small crafted models, their compressed forms, and the sample models."""
    tmp.mkdir(parents=True, exist_ok=True)
    plain = [(".onnx", b) for b in _small_onnx()] + [(".safetensors", b) for b in _small_safetensors()]
    found = [pack(s, b) for s, b in plain]
    for i, (suffix, body) in enumerate(plain):
        for recipe in recipes()[:3]:
            try:
                found.append(pack(suffix, _compressed(suffix, body, recipe, tmp / f"c{i}")))
            except ModelpressError:
                pass
            shutil.rmtree(tmp / f"c{i}", ignore_errors=True)
    if include_samples:
        for path in sorted(SAMPLES.glob("*.onnx")) + sorted(SAMPLES.glob("*.safetensors")):
            found.append(pack(path.suffix, path.read_bytes()))
    return found


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]

