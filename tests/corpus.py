"""A corpus of bad, odd and hostile model files, built on the fly (nothing binary is committed).

The entries live in corpus_safetensors.py (damaged files of either format,
safetensors headers, odd values), corpus_onnx.py and corpus_sharded.py. `build_corpus(root)`
writes every entry into its own folder under `root` (so
external data files sit beside their model) and returns the entries. Each
entry says what must happen when the CLI meets it:

- `read_error`: no command can read it; every command fails with one line
  naming the file and containing this text.
- `compress_error`: readable (inspect and decompress succeed) but compress
  refuses with one line containing this text, for every recipe (a dict maps
  recipe names to texts when recipes differ).
- `write_error`: inspect succeeds, but compress and decompress refuse to write
  (an input that is not a valid model) with one line containing this text.
- `decode_error`: a damaged modelpress-compressed file: inspect and decompress
  fail with this text (compress refuses it as already compressed).
- none of these: every command succeeds.

Very large dims (1 x 10^8) are covered without 400 MB files: headers and
ONNX tensors that claim such shapes over short bodies (the error path), and a
real zero-element [10^8, 0] tensor. A real [1, 10^8] tensor (a sparse 100 MB
file) is in tests/test_hostile_inputs.py, outside the per-recipe loop.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
BIG = 10**8


@dataclass
class Entry:
    """One corpus file and what the CLI must do with it."""

    name: str
    path: Path
    read_error: str | None = None
    compress_error: str | dict[str, str] | None = None
    write_error: str | None = None
    decode_error: str | None = None
    stage_args: tuple[str, ...] = ()  # added after every stage (e.g. --include)
    group_args: tuple[str, ...] = ()  # compress options (e.g. --allow-nonfinite)
    untouched: tuple[str, ...] = ()  # tensors a successful compress must leave bit-identical

    def expected_error(self, command: str, recipe: str = "") -> str | None:
        """The text the one error line must contain, or None if `command` must succeed."""
        if self.read_error is not None:
            return self.read_error
        if command == "compress":
            if isinstance(self.compress_error, dict):
                return self.compress_error.get(recipe, self.write_error)
            return self.compress_error if self.compress_error is not None else self.write_error
        if command == "inspect":
            return self.decode_error
        return self.decode_error if self.decode_error is not None else self.write_error


# -- raw builders --------------------------------------------------------------


def st_raw(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """safetensors bytes from a header (dict or raw JSON bytes) and data; `length` overrides."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def st_file(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path))
    return path


def weights(*shape: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def onnx_model(inits: list[TensorProto], nodes: list[onnx.NodeProto] | None = None,
               opset: int = 17, inputs: list | None = None, outputs: list | None = None,
               elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> MatMul(w1) -> MatMul(w2) -> y unless nodes are given; no checker (bad models too)."""
    if nodes is None:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
                 helper.make_node("MatMul", ["h", "w2"], ["y"])]
    inputs = inputs or [helper.make_tensor_value_info("x", elem, ["batch", 64])]
    outputs = outputs or [helper.make_tensor_value_info("y", elem, ["batch", 64])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def save_onnx(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def good_onnx(dtype=np.float32, w1=None) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w1 = weights(64, 64, seed=1, dtype=dtype) if w1 is None else w1
    return onnx_model([numpy_helper.from_array(w1, "w1"),
                       numpy_helper.from_array(weights(64, 64, seed=2, dtype=dtype), "w2")],
                      elem=elem)


def external(name: str, dims: list[int], location: str, **extra: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims,
                         data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, **{k: str(v) for k, v in extra.items()}}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def external_model(folder: Path, location: str, data: bytes | None = b"", dims=(64, 64),
                   **extra: int) -> Path:
    """w1 stored as external data at `location` (data written to folder/location if given)."""
    if data is not None and not location.startswith("/") and ".." not in location:
        (folder / location).write_bytes(data)
    model = onnx_model([external("w1", list(dims), location, **extra),
                        numpy_helper.from_array(weights(64, 64, seed=2), "w2")])
    return save_onnx(folder / "model.onnx", model)


class Hostile:
    """Unpickling this creates a marker file: proof that a pickle was (never) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def marker_path(root: Path) -> Path:
    """Where a loaded pickle from the corpus would leave its mark."""
    return root / "PICKLE-WAS-LOADED"


# -- the corpus ----------------------------------------------------------------

_BUILDERS: list[tuple[str, Callable[[Path], dict]]] = []


def entry(name: str) -> Callable:
    def wrap(fn: Callable[[Path], dict]) -> Callable[[Path], dict]:
        _BUILDERS.append((name, fn))
        return fn
    return wrap


def compressed(d: Path, sample: str, stages: list[str]) -> Path:
    from modelpress import Recipe, compress
    from modelpress.core.registry import REGISTRY
    src = d / f"src{Path(sample).suffix}"
    shutil.copy(SAMPLES / sample, src)
    out = d / f"model{Path(sample).suffix}"
    stage = REGISTRY[stages[0]](**dict(zip(stages[1::2], stages[2::2])))
    compress(src, out, Recipe([stage]))
    src.unlink()
    return out


def _load_entries() -> None:
    """Register the entries (the modules add themselves to _BUILDERS when imported)."""
    import corpus_safetensors  # noqa: F401
    import corpus_onnx  # noqa: F401
    import corpus_sharded  # noqa: F401


def build_corpus(root: Path) -> list[Entry]:
    """Write every corpus entry under `root` (one folder each) and return them."""
    _load_entries()
    entries = []
    for name, build in _BUILDERS:
        folder = root / name
        folder.mkdir(parents=True)
        entries.append(Entry(name=name, **build(folder)))
    return entries


def names() -> list[str]:
    """Entry names, without building anything (for test ids)."""
    _load_entries()
    return [name for name, _ in _BUILDERS]
