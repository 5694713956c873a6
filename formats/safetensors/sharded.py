"""Sharded safetensors checkpoints: `*.safetensors.index.json` and its shard files.

The index maps every tensor to the shard that holds it (`weight_map`); the
checkpoint is read through it one tensor at a time. Written checkpoints keep
the input's shards (each input shard's tensors go to the output shard of the
same name) or are re-cut to a maximum shard size. Every output shard carries
the `modelpress` entry of its own `__metadata__` for the tensors it holds (a
compressed tensor's parts never straddle two shards), so each shard stands on
its own and the checkpoint is read back through its index.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

import numpy as np

from modelpress.core.encoded import Encoded
from modelpress.core.errors import ModelReadError, ModelWriteError
from modelpress.core.store import EncodedItems, Progress, WriteOptions, WriteResult, in_store_order
from modelpress.core.tensorinfo import TensorInfo

from modelpress.formats.atomic import atomic_paths
from modelpress.formats.location import (AnyPath, ObjectPath, file_size, is_file, location,
                                          read_bytes)
from modelpress.formats.safetensors.store import (FORMAT_VERSION, METADATA_KEY, SafetensorsStore,
                                                  refuse_calibration, safetensors_options)
from modelpress.formats.safetensors.header import dtype_code, loads_strict
from modelpress.formats.safetensors.layout import check_part_names, encode_tensor
from modelpress.formats.safetensors.stream import Slot, Spill

INDEX_SUFFIX = ".safetensors.index.json"
# Index metadata keys modelpress recomputes or owns; others are kept as they are.
_OWN_INDEX_KEYS = ("total_size",)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def is_index(path: str | Path | PurePosixPath | ObjectPath) -> bool:
    """True for a sharded checkpoint's index file name (`*.safetensors.index.json`)."""
    return (path.name if isinstance(path, ObjectPath) else Path(path).name).endswith(INDEX_SUFFIX)


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '2GiB' or '1000000' (kB/MB/GB are powers of 10)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or 1000000")
    unit = (match.group(2) or "").lower()
    unit = unit[:-1] if unit.endswith("b") else unit
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return value


def read_index(path: AnyPath) -> tuple[dict[str, str], dict[str, Any]]:
    """The (weight_map, metadata) of an index file (a path or a URL), checked; raise
    ModelReadError."""
    try:
        doc = loads_strict(read_bytes(location(path)).decode("utf-8"))
    except OSError as exc:
        raise ModelReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ModelReadError(f"{path}: not a valid safetensors index (not JSON)") from None
    except ValueError as exc:
        what = "not JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ModelReadError(f"{path}: not a valid safetensors index ({what})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ModelReadError(f"{path}: not a valid safetensors index (needs a 'weight_map' "
                             "object mapping tensor names to shard files)")
    for shard in set(weight_map.values()):
        if "/" in shard or "\\" in shard or shard in ("", ".", "..") or shard.startswith("."):
            raise ModelReadError(f"{path}: shard file {shard!r} is not a plain file name in "
                                 "the index's folder; refusing to read it")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ModelReadError(f"{path}: not a valid safetensors index ('metadata' must be an "
                             "object)")
    return weight_map, metadata


def shard_files(path: AnyPath) -> list[str]:
    """The shard file names an index refers to, sorted."""
    return sorted(set(read_index(path)[0].values()))


class ShardedStore:
    """A sharded safetensors checkpoint opened through its index; tensors in shard order."""

    format = "safetensors"
    sharded = True

    def __init__(self, path: AnyPath | str) -> None:
        self.path = location(path)
        weight_map, self.index_metadata = read_index(self.path)
        folder = self.path.parent
        self.shards: dict[str, SafetensorsStore] = {}
        for name in sorted(set(weight_map.values())):
            shard = folder / name
            if not is_file(shard):
                missing = next(t for t, s in weight_map.items() if s == name)
                raise ModelReadError(f"{self.path}: shard {name!r} (holding {missing!r}) is "
                                     "missing; keep every shard beside the index")
            # (object storage has no links)
            if isinstance(shard, Path) and shard.resolve().parent != folder.resolve():
                raise ModelReadError(f"{self.path}: shard {name!r} is a link to a file outside "
                                     "the index's folder; refusing to read it")
            self.shards[name] = SafetensorsStore(shard)
        self._home: dict[str, str] = {}
        for name, store in self.shards.items():
            for tensor in store.header.entries:
                listed = weight_map.get(tensor)
                if listed != name:
                    where = "does not list it" if listed is None else f"places it in {listed!r}"
                    raise ModelReadError(f"{self.path}: shard {name!r} holds tensor {tensor!r} "
                                         f"but the index {where}; the checkpoint is inconsistent")
                self._home[tensor] = name
        absent = [t for t in weight_map if t not in self._home]
        if absent:
            raise ModelReadError(f"{self.path}: tensor {absent[0]!r} is listed in the index but "
                                 f"missing from shard {weight_map[absent[0]]!r}")
        self._tensors = {n: info for s in self.shards.values() for n, info in s.tensors.items()}
        self.encodings = {n: spec for s in self.shards.values()
                          for n, spec in s.encodings.items()}
        self._spec_home = {n: s for s in self.shards.values() for n in s.encodings}

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def files(self) -> list[AnyPath]:
        """The index and every shard."""
        return [self.path] + [s.path for s in self.shards.values()]

    @property
    def data_files(self) -> list[AnyPath]:
        """The shard files (an output may not be one of them)."""
        return [s.path for s in self.shards.values()]

    @property
    def file_bytes(self) -> int:
        return file_size(self.path) + sum(s.file_bytes for s in self.shards.values())

    def read(self, name: str) -> np.ndarray:
        return self.shards[self._home[name]].read(name)

    def logical_tensors(self) -> Iterator[tuple[str, TensorInfo, Encoded | None, int]]:
        """Tensors as the original model had them (see SafetensorsStore.logical_tensors)."""
        for store in self.shards.values():
            yield from store.logical_tensors()

    def decode(self, name: str) -> Encoded:
        """The encoded tree of a tensor stored in a compressed layout."""
        return self._spec_home[name].decode(name)

    def calibrate(self, calibration: Path, selected: set[str]) -> list[str]:
        """Refused: calibration runs the model, and a checkpoint holds weights only."""
        raise refuse_calibration(calibration, self.path)

    def write(self, dst: Path, encoded: EncodedItems, progress: Progress | None = None,
              *, metadata: Mapping[str, str] | None = None,
              options: WriteOptions | None = None) -> WriteResult:
        """Write shards and an index at `dst`, with `encoded` tensors in compressed layouts.

        `encoded` may be a stream of (name, encoded) pairs in tensor order:
        each tensor's bytes are spilled to disk as it arrives (see stream.py)
        and the shards are assembled at the end. `options`
        (SafetensorsWriteOptions) may cut shards of a maximum size instead of
        keeping the input's.
        """
        max_shard_size = safetensors_options(options).max_shard_size
        _check_destination(self, dst)
        units: list[_Unit] = []
        tensor_bytes: dict[str, int] = {}
        parts_of: dict[str, list[str]] = {}
        with Spill(dst) as spill:
            for name, enc in in_store_order(self._tensors, encoded):
                home = self._home[name]
                if enc is None:
                    units.append(_Unit(home, [self.shards[home].copy_slot(name)], {}))
                    continue
                info = self._tensors[name]
                spec, parts = encode_tensor(name, enc, set())
                spec.update(dtype=dtype_code(info.dtype), shape=list(info.shape),
                            encoding=enc.describe())
                tensor_bytes[name] = sum(a.nbytes for _, a in parts)
                parts_of[name] = [key for key, _ in parts]
                units.append(_Unit(home, [spill.add_array(k, a) for k, a in parts], {name: spec}))
                del parts, enc  # the bytes are on disk now
            check_part_names(list(self._tensors), parts_of)
            plan = _plan_shards(self, units, dst, max_shard_size)
            size = _write_checkpoint(self, dst, plan, dict(metadata or {}), spill, progress)
        return WriteResult(tensor_bytes=tensor_bytes, file_bytes=size)


@dataclass
class _Unit:
    """A tensor as stored: its slots (spilled bytes, or input bytes to copy) and spec."""

    home: str
    slots: list[Slot]
    specs: dict[str, dict[str, Any]]

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for slot in self.slots)


@dataclass
class _Shard:
    """One output shard: its file name, its tensors, and its header metadata."""

    name: str
    units: list[_Unit] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _check_destination(store: ShardedStore, dst: Path) -> None:
    if not is_index(dst):
        raise ModelWriteError(f"{dst}: a sharded checkpoint is written as shards plus an index; "
                              f"name the output *{INDEX_SUFFIX}")
    if isinstance(store.path, Path) and dst.parent.resolve() == store.path.parent.resolve():
        raise ModelWriteError(f"{dst}: the output shards would go into the input's folder "
                              f"{store.path.parent}; write the checkpoint to another folder")


def _base_metadata(store: SafetensorsStore) -> dict[str, str]:
    return {k: v for k, v in store.header.metadata.items() if not k.startswith(METADATA_KEY)}


def _plan_shards(store: ShardedStore, units: list[_Unit], dst: Path,
                 max_shard_size: int | None) -> list[_Shard]:
    """Keep the input's shards, or cut new ones of at most `max_shard_size` data bytes.

    A tensor larger than the limit gets a shard of its own, as transformers does.
    """
    if max_shard_size is None:
        shards = {name: _Shard(name, metadata=_base_metadata(s))
                  for name, s in store.shards.items()}
        for unit in units:
            shards[unit.home].units.append(unit)
        return list(shards.values())
    groups: list[list[_Unit]] = [[]]
    size = 0
    for unit in units:
        if groups[-1] and size + unit.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += unit.nbytes
    prefix = dst.name[: -len(INDEX_SUFFIX)] or "model"
    base = _base_metadata(next(iter(store.shards.values())))
    count = len(groups)
    return [_Shard(f"{prefix}-{i:05d}-of-{count:05d}.safetensors", group, dict(base))
            for i, group in enumerate(groups, 1)]


def _write_checkpoint(store: ShardedStore, dst: Path, shards: list[_Shard],
                      extra: dict[str, str], spill: Spill, progress: Progress | None) -> int:
    """Write every shard and then the index, all renamed into place at the end."""
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        specs = {n: s for unit in shard.units for n, s in unit.specs.items()}
        for key in [k for k in shard.metadata if k.startswith(METADATA_KEY)]:
            del shard.metadata[key]
        if specs:
            shard.metadata[METADATA_KEY] = json.dumps(
                {"format_version": FORMAT_VERSION, "tensors": specs}, separators=(",", ":"))
        for unit in shard.units:
            for slot in unit.slots:
                weight_map[slot.name] = shard.name
                total += slot.nbytes
    index_meta = {k: v for k, v in store.index_metadata.items()
                  if k not in _OWN_INDEX_KEYS and not k.startswith(METADATA_KEY)}
    index_meta.update(total_size=total, **extra)
    index = {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))}
    old_shards = _previous_shards(dst)
    targets = [dst.parent / s.name for s in shards] + [dst]
    with atomic_paths(targets) as tmps:
        for i, (shard, tmp) in enumerate(zip(shards, tmps)):
            if progress:
                progress(i, len(shards), f"writing {shard.name}")
            with open(tmp, "wb", buffering=0) as out:
                spill.assemble(out, [s for unit in shard.units for s in unit.slots],
                               shard.metadata)
        tmps[-1].write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        size = sum(t.stat().st_size for t in tmps)
    new = {s.name for s in shards}
    for stale in old_shards - new:
        path = dst.parent / stale
        if path.is_file() and not path.is_symlink():
            path.unlink()
    return size


def _previous_shards(dst: Path) -> set[str]:
    """Shards named by an index already at `dst` (they are removed if no longer used)."""
    if not dst.is_file():
        return set()
    try:
        return set(shard_files(dst))
    except ModelReadError:
        return set()


def write_decompressed(store: ShardedStore, dst: Path) -> WriteResult:
    """Write the checkpoint with every compressed tensor restored, keeping its shards.

    One tensor is decoded at a time and spilled, so memory follows the largest tensor.
    """
    _check_destination(store, dst)
    restored: dict[str, int] = {}
    shards = []
    with Spill(dst) as spill:
        for shard_name, shard in store.shards.items():
            units = []
            for name, info, encoded, _ in shard.logical_tensors():
                if encoded is None:
                    units.append(_Unit(shard_name, [shard.copy_slot(name)], {}))
                else:
                    array = encoded.decode().astype(info.dtype)
                    restored[name] = array.nbytes
                    units.append(_Unit(shard_name, [spill.add_array(name, array)], {}))
                    del array, encoded
            shards.append(_Shard(shard_name, units, _base_metadata(shard)))
        size = _write_checkpoint(store, dst, shards, {}, spill, None)
    return WriteResult(tensor_bytes=restored, file_bytes=size)
