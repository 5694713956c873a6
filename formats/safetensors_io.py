"""safetensors models: read one tensor at a time, write compressed tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from safetensors import safe_open

from compress_core.encoded import Encoded
from compress_core.errors import ModelReadError, ModelWriteError
from compress_core.store import Progress, WriteResult
from compress_core.tensorinfo import TensorInfo

from .atomic import atomic_path
from .st_header import DTYPES, Header, dtype_code, encode_header, read_header
from .st_layout import decode_tensor, encode_tensor, part_names
from .tree_check import check_tree

METADATA_KEY = "modelpress"
FORMAT_VERSION = 1
# safe_open's numpy backend has no float8 dtypes; those are read from the map directly.
_NUMPY_UNSUPPORTED = {"F8_E4M3", "F8_E5M2"}


class SafetensorsStore:
    """A .safetensors file opened for reading; tensors in file order."""

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.header: Header = read_header(self.path)
        self._tensors = {
            name: _info(name, e.shape, e.np_dtype) for name, e in self.header.entries.items()}
        self.encodings = _read_encodings(self.path, self.header)
        self._handle = None

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def read(self, name: str) -> np.ndarray:
        """One stored tensor, as numpy (bf16/fp8 through ml_dtypes)."""
        entry = self.header.entries[name]
        if entry.dtype in _NUMPY_UNSUPPORTED:
            raw = np.fromfile(self.path, dtype=np.uint8, count=entry.end - entry.begin,
                              offset=entry.begin)
            return raw.view(entry.np_dtype).reshape(entry.shape)
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="np")
            return self._handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelReadError(f"{self.path}: cannot read tensor {name!r}: {exc}") from None

    # -- compressed content --------------------------------------------------

    def logical_tensors(self) -> Iterator[tuple[str, TensorInfo, Encoded | None, int]]:
        """Tensors as the original model had them.

        Yields (name, info, encoding or None if stored plainly, bytes stored).
        """
        emitted = set()
        for name, info in self._tensors.items():
            owner = self._owner(name)
            if owner is None:
                yield name, info, None, info.nbytes
            elif owner not in emitted:
                emitted.add(owner)
                spec = self.encodings[owner]
                stored = sum(self._tensors[p].nbytes for p in part_names(spec))
                info = _info(owner, tuple(spec["shape"]), DTYPES[spec["dtype"]])
                yield owner, info, self.decode(owner), stored

    def decode(self, name: str) -> Encoded:
        """The encoded tree of a tensor this file stores in a compressed layout."""
        spec = self.encodings[name]
        try:
            tree = decode_tensor(spec, self.read)
            check_tree(tree, tuple(spec["shape"]))
            return tree
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise ModelReadError(f"{self.path}: tensor {name!r}: corrupt modelpress layout "
                                 f"({type(exc).__name__}: {exc})") from None

    def _owner(self, stored_name: str) -> str | None:
        if not hasattr(self, "_owners"):
            self._owners = {p: o for o, spec in self.encodings.items() for p in part_names(spec)}
        return self._owners.get(stored_name)

    # -- writing -------------------------------------------------------------

    def write(self, dst: Path, encoded: Mapping[str, Encoded],
              progress: Progress | None = None, *,
              metadata: Mapping[str, str] | None = None) -> WriteResult:
        """Write this model with `encoded` tensors in their compressed layouts.

        `metadata` entries are added to the header's `__metadata__`.
        """
        taken = set(self._tensors) - set(encoded)
        entries: list[tuple[str, Any]] = []  # (stored name, array or None = copy from input)
        specs: dict[str, dict[str, Any]] = {}
        tensor_bytes: dict[str, int] = {}
        for name, info in self._tensors.items():
            if name not in encoded:
                entries.append((name, None))
                continue
            spec, parts = encode_tensor(name, encoded[name], taken)
            taken.update(key for key, _ in parts)
            spec.update(dtype=dtype_code(info.dtype), shape=list(info.shape),
                        encoding=encoded[name].describe())
            specs[name] = spec
            tensor_bytes[name] = sum(a.nbytes for _, a in parts)
            entries.extend(parts)
        extra = dict(metadata or {})
        # Every modelpress-owned key ("modelpress", "modelpress.source") is rewritten.
        metadata = {k: v for k, v in self.header.metadata.items()
                    if not k.startswith(METADATA_KEY)}
        if specs:
            metadata[METADATA_KEY] = json.dumps(
                {"format_version": FORMAT_VERSION, "tensors": specs}, separators=(",", ":"))
        metadata.update(extra)
        size = write_safetensors(dst, entries, metadata, self, progress)
        return WriteResult(tensor_bytes=tensor_bytes, file_bytes=size)


def write_safetensors(dst: Path, entries: list[tuple[str, np.ndarray | None]],
                      metadata: dict[str, str], source: SafetensorsStore | None = None,
                      progress: Progress | None = None) -> int:
    """Write tensors atomically; an entry with array None is copied from `source`.

    Tensors are ordered by alignment (widest dtype first, stable) so every
    tensor starts on a multiple of its element size, as safetensors itself does.
    """
    def meta(name: str, array: np.ndarray | None) -> tuple[str, str, tuple[int, ...], int]:
        if array is None:
            e = source.header.entries[name]
            return name, e.dtype, e.shape, e.end - e.begin
        return name, dtype_code(array.dtype), tuple(array.shape), array.nbytes

    ordered = sorted(entries, key=lambda item: -_itemsize(item, source))
    head = encode_header([meta(n, a) for n, a in ordered], metadata)
    with atomic_path(dst) as tmp:
        with open(tmp, "wb") as out:
            out.write(head)
            for i, (name, array) in enumerate(ordered):
                if progress:
                    progress(i, len(ordered), f"writing {name}")
                if array is None:
                    _copy_range(source, name, out)
                else:
                    out.write(np.ascontiguousarray(array).tobytes())
        size = tmp.stat().st_size
    return size


def _itemsize(item: tuple[str, np.ndarray | None], source: SafetensorsStore | None) -> int:
    name, array = item
    if array is None:
        return source.header.entries[name].np_dtype.itemsize
    return array.dtype.itemsize


def _copy_range(source: SafetensorsStore, name: str, out: Any) -> None:
    """Copy a tensor's bytes unchanged, in bounded chunks."""
    entry = source.header.entries[name]
    with open(source.path, "rb") as fh:
        fh.seek(entry.begin)
        remaining = entry.end - entry.begin
        while remaining:
            chunk = fh.read(min(remaining, 1 << 24))
            if not chunk:
                raise ModelWriteError(f"{source.path}: file shrank while reading {name!r}")
            out.write(chunk)
            remaining -= len(chunk)


def _info(name: str, shape: tuple[int, ...], dtype: np.dtype) -> TensorInfo:
    # torch layout: a Linear weight is [out, in], a Conv weight [out, in, kh, kw].
    weight_like = len(shape) >= 2
    return TensorInfo(name=name, shape=shape, dtype=dtype, weight_like=weight_like,
                      channel_axis=0 if weight_like else None,
                      block_axis=1 if weight_like else None,
                      role="linear" if weight_like else None, format="safetensors",
                      sensitive=sensitive_name(name) if weight_like else None)


# Module names (the tensor name without ".weight") whose last part marks an output head.
_HEADS = {"lm_head", "output", "embed_out"}


def sensitive_name(name: str) -> str | None:
    """"embedding" or "head" from a tensor's name (Hugging Face and llama conventions).

    Embeddings: a module path part containing "embed" (embed_tokens,
    word_embeddings, tok_embeddings, embed_positions), or named wte / wpe.
    Heads: a part named lm_head, or a last part named output or embed_out.
    """
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    parts = module.split(".")
    if "lm_head" in parts or parts[-1] in _HEADS:
        return "head"
    if any("embed" in part for part in parts) or parts[-1] in ("wte", "wpe"):
        return "embedding"
    return None


def _read_encodings(path: Path, header: Header) -> dict[str, dict[str, Any]]:
    raw = header.metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
        specs = doc["tensors"]
        if doc.get("format_version", 0) > FORMAT_VERSION:
            raise ModelReadError(f"{path}: written by a newer modelpress (layout version "
                                 f"{doc['format_version']}); upgrade modelpress")
        for name, spec in specs.items():
            missing = [p for p in part_names(spec) if p not in header.entries]
            if missing or spec.get("dtype") not in DTYPES:
                raise ValueError(f"tensor {name!r} lacks {missing or 'a dtype'}")
        return specs
    except ModelReadError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelReadError(f"{path}: corrupt modelpress metadata ({exc})") from None


def write_decompressed(store: SafetensorsStore, dst: Path) -> WriteResult:
    """Write `store` with every compressed tensor restored to its original dense dtype."""
    entries: list[tuple[str, np.ndarray | None]] = []
    restored: dict[str, int] = {}
    for name, info, encoded, _ in store.logical_tensors():
        if encoded is None:
            entries.append((name, None))
        else:
            array = encoded.decode().astype(info.dtype)
            entries.append((name, array))
            restored[name] = array.nbytes
    metadata = {k: v for k, v in store.header.metadata.items() if not k.startswith(METADATA_KEY)}
    size = write_safetensors(dst, entries, metadata, store)
    return WriteResult(tensor_bytes=restored, file_bytes=size)
