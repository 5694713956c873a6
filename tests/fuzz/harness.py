"""What the fuzzer runs on one input, the seed inputs, and the mutations it applies.

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
import json
import random
import shutil
import signal
import traceback
import zlib
from pathlib import Path
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress_core import (REGISTRY, ModelpressError, Options, Prune, Quantize, Recipe, compress,
                           decompress, inspect)
from formats import open_model

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
    if "cluster" in REGISTRY:
        chosen.append(Recipe([REGISTRY["cluster"]()]))
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

    from cli.render import print_inspect
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

    from cli.render import print_report
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


# -- mutations -------------------------------------------------------------------

_ODD_VALUES = [None, True, -1, 0, 1, 2, 3, 7, 8, 255, 2**31, 2**40, 2**63, -2**63, 1.5, float("nan"),
               "", "x", "F32", "I64", "BF16", "group", "channel", "tensor", [], [0], [1, 1], {}]


def _json_mutate(value, rng: random.Random, depth: int = 0):
    """Replace, delete or add one thing somewhere in a JSON value."""
    if isinstance(value, dict) and value and depth < 8:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.15:
            value.pop(key)
        elif roll < 0.25:
            value[key + rng.choice(["_", ".weight", "x"])] = value[key]
        else:
            value[key] = _json_mutate(value[key], rng, depth + 1)
        return value
    if isinstance(value, list) and value and depth < 8 and rng.random() < 0.7:
        i = rng.randrange(len(value))
        roll = rng.random()
        if roll < 0.15:
            value.pop(i)
        elif roll < 0.3:
            value.append(rng.choice(value))
        else:
            value[i] = _json_mutate(value[i], rng, depth + 1)
        return value
    if isinstance(value, str) and value.startswith("{") and rng.random() < 0.8:
        try:  # JSON inside a string: modelpress metadata
            return json.dumps(_json_mutate(json.loads(value), rng, depth + 1))
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return value + rng.choice([-1, 1, -8, 8, 4096, -value, value])
    return rng.choice(_ODD_VALUES)


def mutate_safetensors(body: bytes, rng: random.Random) -> bytes:
    """Edit the header: its JSON (dtypes, shapes, offsets, metadata) or its length field."""
    if len(body) < 8:
        return body
    length = int.from_bytes(body[:8], "little")
    if rng.random() < 0.15 or length > len(body) - 8:
        new = rng.choice([length + rng.randint(-16, 16), rng.getrandbits(64), 0, len(body)])
        return max(0, min(new, 2**64 - 1)).to_bytes(8, "little") + body[8:]
    try:
        header = json.loads(body[8:8 + length])
    except ValueError:
        return body
    for _ in range(rng.randint(1, 3)):
        header = _json_mutate(header, rng)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body[8 + length:]


_OPS = ["MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Add", "DequantizeLinear", "Constant",
        "Cast", "Reshape"]
_LOCATIONS = [SIDE_FILE, "../" + SIDE_FILE, "/etc/hostname", "missing.bin", "", "model.onnx",
              "./" + SIDE_FILE, "sub/../" + SIDE_FILE]


def _mutate_tensor(t: onnx.TensorProto, rng: random.Random) -> None:
    roll = rng.randrange(6)
    if roll == 0 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 3, 64, -1, 2**31, 2**62])
    elif roll == 1:
        t.data_type = rng.choice([0, 1, 2, 3, 6, 7, 9, 10, 16, 17, 21, 22, 8, 99])
    elif roll == 2:
        t.raw_data = t.raw_data[: rng.randint(0, len(t.raw_data))]
    elif roll == 3:
        t.raw_data = t.raw_data + bytes(rng.randint(1, 64))
    elif roll == 4:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", rng.choice(_LOCATIONS)),
                           ("offset", str(rng.choice([0, 4, -4, 16384, 2**40]))),
                           ("length", str(rng.choice([0, 64, 16384, 2**40])))):
            if rng.random() < 0.8:
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    else:
        t.dims.append(rng.choice([1, 2, 0]))


def mutate_onnx(body: bytes, rng: random.Random) -> bytes:
    """Edit the model: tensors, nodes, opset, modelpress metadata."""
    try:
        model = onnx.load_from_string(body)
    except Exception:
        return body
    graph = model.graph
    roll = rng.randrange(7)
    if roll == 0 and graph.initializer:
        _mutate_tensor(rng.choice(graph.initializer), rng)
    elif roll == 1 and graph.node:
        node = rng.choice(graph.node)
        choice = rng.randrange(3)
        if choice == 0:
            node.op_type = rng.choice(_OPS)
        elif choice == 1 and node.input:
            node.input[rng.randrange(len(node.input))] = rng.choice(
                [i.name for i in graph.initializer] + ["", "nope"])
        else:
            node.attribute.append(helper.make_attribute(rng.choice(["axis", "transB", "block_size"]),
                                                        rng.choice([-1, 0, 1, 2, 16])))
    elif roll == 2 and graph.initializer:
        del graph.initializer[rng.randrange(len(graph.initializer))]
    elif roll == 3:
        model.opset_import[0].version = rng.choice([1, 7, 11, 13, 19, 21, 23, 99])
    elif roll == 4 and model.metadata_props:
        prop = rng.choice(model.metadata_props)
        new = _json_mutate(prop.value, rng)
        prop.value = new if isinstance(new, str) else json.dumps(new)
    elif roll == 5:
        model.ir_version = rng.choice([1, 3, 4, 7, 8, 10, 11, 99])
    elif graph.initializer:
        rng.choice(graph.initializer).name = rng.choice([n.name for n in graph.initializer] + ["x"])
    try:
        return model.SerializeToString()
    except Exception:
        return body


def mutate_bytes(body: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """Bit flips, overwritten or inserted bytes, truncation, and splices with another input."""
    data = bytearray(body)
    roll = rng.randrange(6)
    if roll == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif roll == 1 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif roll == 2:
        return bytes(data[: rng.randint(0, len(data))])
    elif roll == 3:
        at = rng.randint(0, len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 32))
    elif roll == 4 and others:
        other = rng.choice(others)
        return bytes(data[: rng.randint(0, len(data))]) + other[rng.randint(0, len(other)):]
    elif data:
        at, size = rng.randrange(len(data)), rng.randint(1, 64)
        del data[at:at + size]
    return bytes(data)


def mutate(data: bytes, rng: random.Random, others: list[bytes] = ()) -> bytes:
    """One mutation of a packed input: structure-aware for its format, or raw bytes."""
    suffix, body = unpack(data)
    if rng.random() < 0.55:
        try:
            return pack(suffix, (mutate_onnx if suffix == ".onnx" else mutate_safetensors)(body, rng))
        except Exception:  # e.g. protobuf refusing to set a non-UTF-8 name: mutate bytes instead
            pass
    return pack(suffix, mutate_bytes(body, rng, [unpack(o)[1] for o in others]))


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]

