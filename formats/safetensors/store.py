"""safetensors models: read one tensor at a time, write compressed tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from modelpress.core.encoded import Encoded
from modelpress.core.errors import InputDataError, ModelReadError
from modelpress.core.store import (EncodedItems, Progress, WriteOptions, WriteResult, in_store_order,
                                   options_for)
from modelpress.core.tensorinfo import TensorInfo

from modelpress.formats.location import AnyPath
from modelpress.formats.source import ByteSource, open_source
from modelpress.formats.safetensors.header import (DTYPES, Header, dtype_code, loads_strict,
                                                   read_header)
from modelpress.formats.safetensors.options import SafetensorsWriteOptions
from modelpress.formats.safetensors.layout import (check_part_names, decode_tensor, encode_tensor, part_names)
from modelpress.formats.safetensors.stream import Slot, Spill, write_file
from modelpress.formats.tree_check import check_tree

METADATA_KEY = "modelpress"
FORMAT_VERSION = 1


class SafetensorsStore:
    """A .safetensors file (local, or an object in storage) opened for reading; tensors in
    file order."""

    format = "safetensors"
    sharded = False  # one file (a ShardedStore is the index and its shards)

    def __init__(self, path: AnyPath | str) -> None:
        self.source: ByteSource = open_source(path)
        self.path: AnyPath = self.source.path
        self.header: Header = read_header(self.source)
        self._tensors = {
            name: _info(name, e.shape, e.np_dtype) for name, e in self.header.entries.items()}
        self.encodings = _read_encodings(self.path, self.header)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def data_files(self) -> tuple[Path, ...]:
        """Files besides `path` that hold the model's tensors: none."""
        return ()

    @property
    def file_bytes(self) -> int:
        return self.source.size

    def read(self, name: str) -> np.ndarray:
        """One stored tensor, as numpy (bf16/fp8 through ml_dtypes), read-only.

        Only the tensor's own bytes are read (see modelpress.formats.source): mapped
        from a local file, not the whole file as `safe_open` does, or one ranged
        GET from storage. The header was checked when the store opened, so
        offsets, dtype and shape agree.
        """
        entry = self.header.entries[name]
        try:
            return self.source.array(entry.begin, entry.np_dtype, entry.shape)
        except (OSError, ValueError) as exc:
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

    def calibrate(self, calibration: Path, selected: set[str]) -> list[str]:
        """Refused: calibration runs the model, and a safetensors file holds weights only."""
        raise refuse_calibration(calibration, self.path)

    def write(self, dst: Path, encoded: EncodedItems,
              progress: Progress | None = None, *,
              metadata: Mapping[str, str] | None = None,
              options: WriteOptions | None = None) -> WriteResult:
        """Write this model with `encoded` tensors in their compressed layouts.

        `encoded` is a mapping or a stream of (name, encoded) pairs in tensor
        order; each tensor's bytes go to disk as it arrives, so only the
        tensors in flight are in memory. `metadata` entries are added to the
        header's `__metadata__`. `options` (SafetensorsWriteOptions) change
        nothing for a single file: it is written as one file.
        """
        safetensors_options(options)
        dst = Path(dst)
        with Spill(dst) as spill:
            slots, specs, tensor_bytes = self.spill_tensors(spill, encoded)
            metadata = self.output_metadata(specs, metadata)
            size = write_file(dst, slots, metadata, spill, progress)
        return WriteResult(tensor_bytes=tensor_bytes, file_bytes=size)

    def spill_tensors(self, spill: Spill, encoded: EncodedItems
                      ) -> tuple[list[Slot], dict[str, dict[str, Any]], dict[str, int]]:
        """Every tensor of this file as output slots, encoded ones in their layouts.

        Returns (slots in tensor order, spec per encoded tensor, bytes per encoded tensor).
        """
        slots: list[Slot] = []
        specs: dict[str, dict[str, Any]] = {}
        tensor_bytes: dict[str, int] = {}
        parts_of: dict[str, list[str]] = {}
        for name, enc in in_store_order(self._tensors, encoded):
            if enc is None:
                slots.append(self.copy_slot(name))
                continue
            info = self._tensors[name]
            spec, parts = encode_tensor(name, enc, set())
            spec.update(dtype=dtype_code(info.dtype), shape=list(info.shape),
                        encoding=enc.describe())
            specs[name] = spec
            parts_of[name] = [key for key, _ in parts]
            tensor_bytes[name] = sum(a.nbytes for _, a in parts)
            slots.extend(spill.add_array(key, array) for key, array in parts)
            del parts, enc  # the bytes are on disk now
        check_part_names(list(self._tensors), parts_of)
        return slots, specs, tensor_bytes

    def copy_slot(self, name: str) -> Slot:
        """An output slot that copies a tensor of this file unchanged."""
        e = self.header.entries[name]
        return Spill.add_copy(name, self.source, e.begin, e.dtype, e.shape, e.end - e.begin,
                              e.np_dtype.itemsize)

    def output_metadata(self, specs: dict[str, dict[str, Any]],
                        extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The output's `__metadata__`: this file's, with modelpress's entry rewritten."""
        # Every modelpress-owned key ("modelpress", "modelpress.source") is rewritten.
        metadata = {k: v for k, v in self.header.metadata.items()
                    if not k.startswith(METADATA_KEY)}
        if specs:
            metadata[METADATA_KEY] = json.dumps(
                {"format_version": FORMAT_VERSION, "tensors": specs}, separators=(",", ":"))
        metadata.update(extra or {})
        return metadata


def safetensors_options(options: WriteOptions | None) -> SafetensorsWriteOptions:
    """The writer settings for a safetensors output (None: the defaults)."""
    return options_for(SafetensorsWriteOptions, options, "safetensors weights are")


def refuse_calibration(calibration: Path, path: Path) -> InputDataError:
    """The error for --calibration on safetensors weights (there is no model to run)."""
    return InputDataError(f"--calibration {calibration}: needs an ONNX model (it runs the "
                          f"model; {path} holds weights only)")


def write_safetensors(dst: Path, entries: list[tuple[str, np.ndarray | None]],
                      metadata: dict[str, str], source: SafetensorsStore | None = None,
                      progress: Progress | None = None) -> int:
    """Write tensors atomically; an entry with array None is copied from `source`.

    Tensors are ordered by alignment (widest dtype first, stable) so every
    tensor starts on a multiple of its element size, as safetensors itself does.
    """
    dst = Path(dst)
    with Spill(dst) as spill:
        slots = [source.copy_slot(name) if array is None else spill.add_array(name, array)
                 for name, array in entries]
        return write_file(dst, slots, metadata, spill, progress)


def _info(name: str, shape: tuple[int, ...], dtype: np.dtype) -> TensorInfo:
    # torch layout: a Linear weight is [out, in], a Conv weight [out, in / groups, kh, kw]
    # (whose groups may run along in / groups * kh * kw, flattened: see TensorInfo).
    weight_like = len(shape) >= 2
    return TensorInfo(name=name, shape=shape, dtype=dtype, weight_like=weight_like,
                      channel_axis=0 if weight_like else None,
                      block_axis=1 if weight_like else None,
                      block_span=len(shape) - 1 if len(shape) >= 3 else 1,
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
        doc = loads_strict(raw)
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
    """Write `store` with every compressed tensor restored to its original dense dtype.

    One tensor is decoded at a time and spilled, so memory follows the largest tensor.
    """
    dst = Path(dst)
    restored: dict[str, int] = {}
    with Spill(dst) as spill:
        slots = []
        for name, info, encoded, _ in store.logical_tensors():
            if encoded is None:
                slots.append(store.copy_slot(name))
            else:
                array = encoded.decode().astype(info.dtype)
                slots.append(spill.add_array(name, array))
                restored[name] = array.nbytes
                del array, encoded
        metadata = {k: v for k, v in store.header.metadata.items()
                    if not k.startswith(METADATA_KEY)}
        size = write_file(dst, slots, metadata, spill)
    return WriteResult(tensor_bytes=restored, file_bytes=size)
