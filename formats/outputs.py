"""Batch outputs: where they go, what made them, and copies of the other files.

Every compressed output records what made it under the metadata key
`modelpress.source` (ONNX metadata_props, safetensors `__metadata__`, or the
sharded index's `metadata`): a JSON object with `recipe_sha256` (the recipe
and the run options that change output bytes) and `input_sha256` (the input's
content, see `input_key`). `--skip-existing` compares both with the present run.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from modelpress.core.errors import ModelWriteError

from modelpress.formats.atomic import atomic_path
from modelpress.formats.digest import file_sha256
from modelpress.formats.location import (AnyPath, ObjectPath, exists, file_size, is_file,
                                         location, read_bytes, storage)
from modelpress.formats.onnx.names import data_name
from modelpress.formats.safetensors.ct_config import config_for
from modelpress.formats.safetensors.header import read_header
from modelpress.formats.safetensors.sharded import is_index, read_index, shard_files
from modelpress.formats.source import CHUNK, open_source

SOURCE_KEY = "modelpress.source"


@contextlib.contextmanager
def local_output(dst: AnyPath) -> Iterator[Path]:
    """Where a writer writes the output `dst`: `dst` itself when it is local; for an
    object in storage, a local staging file, uploaded with the files written beside it
    (shards, a data file) when the block succeeds, never partly (see
    modelpress.formats.objectstore.staged)."""
    if isinstance(dst, Path):
        yield dst
        return

    def old_parts(old: Path) -> list[str]:
        return shard_files(old) if is_index(dst) else []
    with storage().staged(dst, old_parts) as local:
        yield local


def input_key(main: AnyPath, others: list[AnyPath]) -> str:
    """The content key of a model's input files.

    One file: its sha256 (what `sha256sum` prints). Several (a sharded
    checkpoint, an ONNX model with external data, a model and its
    config.json): the sha256 of the lines "<path relative to the main file's
    folder>\\t<sha256>\\n", sorted by path.
    """
    if not others:
        return file_sha256(main)
    folder = main.parent
    lines = sorted(f"{_relative(p, folder)}\t{file_sha256(p)}\n" for p in [main, *others])
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _relative(path: AnyPath, folder: AnyPath) -> str:
    if isinstance(path, ObjectPath) and isinstance(folder, ObjectPath):
        return path.relative_to(folder).as_posix()
    return Path(os.path.relpath(path, folder)).as_posix()  # type: ignore[arg-type]


def model_sha256(path: AnyPath | str) -> str:
    """The content key of a model file: its sha256, or for a sharded checkpoint's index
    (or an ONNX model with external data) the `input_key` of all its files."""
    path = location(path)
    if is_index(path):
        weight_map, _ = read_index(path)
        return input_key(path, [path.parent / s for s in sorted(set(weight_map.values()))])
    files = output_files(path)
    return input_key(path, files[1:]) if len(files) > 1 else file_sha256(path)


def source_value(recipe_sha256: str, input_sha256: str) -> str:
    """The `modelpress.source` metadata value."""
    return json.dumps({"recipe_sha256": recipe_sha256, "input_sha256": input_sha256},
                      sort_keys=True, separators=(",", ":"))


def onnx_files() -> ModuleType:
    """modelpress.formats.onnx.files (an ONNX file's external data and metadata)."""
    # loads onnx (0.7 s to import): only for an ONNX output
    import modelpress.formats.onnx.files as files
    return files


def read_source(path: AnyPath) -> dict[str, Any] | None:
    """The `modelpress.source` record of an output, or None if absent or unreadable."""
    try:
        if is_index(path):
            _, metadata = read_index(path)
            raw = metadata.get(SOURCE_KEY)
        elif path.suffix.lower() == ".onnx":
            raw = onnx_files().metadata_value(path, SOURCE_KEY)
        else:
            raw = read_header(path).metadata.get(SOURCE_KEY)
        record = json.loads(raw) if isinstance(raw, str) else None
        return record if isinstance(record, dict) else None
    except Exception:  # any unreadable output is simply not up to date
        return None


def output_files(path: AnyPath) -> list[AnyPath]:
    """The files of a written output: the file itself, an index and its shards, or an
    ONNX model and the external data files it names."""
    if is_index(path):
        try:
            weight_map, _ = read_index(path)
        except Exception:
            return [path]
        return [path] + [path.parent / s for s in sorted(set(weight_map.values()))]
    if path.suffix.lower() == ".onnx":
        return [path] + onnx_data_files(path)
    return [path]


def onnx_data_files(path: AnyPath) -> list[AnyPath]:
    """The external data files an ONNX model names (inside its folder), sorted.

    Without a `<model>.data` file beside it (what modelpress writes), a model
    is taken to be self-contained and is not parsed, so this stays cheap for
    large inline models.
    """
    if not exists(path.parent / data_name(path)):
        return []
    return onnx_files().data_files(path)


def output_bytes(path: AnyPath) -> int:
    """Bytes on disk of a written output (index and shards together)."""
    return sum(file_size(p) for p in output_files(path) if exists(p))


def up_to_date(dst: AnyPath, recipe_sha256: str, input_sha256: str,
               config_src: AnyPath | None = None, config_dst: AnyPath | None = None) -> bool:
    """True if `dst` is complete and was made from this input with this recipe.

    For a sharded output every shard must be present; for a model owning a
    config.json, the output's config.json must be exactly the one this output
    implies.
    """
    record = read_source(dst)
    if record != {"recipe_sha256": recipe_sha256, "input_sha256": input_sha256}:
        return False
    if not all(is_file(p) for p in output_files(dst)):
        return False
    if config_src is not None and config_dst is not None:
        try:
            return is_file(config_dst) and read_bytes(config_dst) == config_for(config_src, dst)
        except Exception:
            return False
    return True


def same_file_content(src: AnyPath, dst: AnyPath) -> bool:
    """True if `dst` exists and holds exactly the bytes of `src`."""
    if isinstance(src, Path) and isinstance(dst, Path):
        return dst.is_file() and not dst.is_symlink() and filecmp.cmp(src, dst, shallow=False)
    if not is_file(dst):
        return False
    one, two = open_source(src), open_source(dst)
    if one.size != two.size:
        return False
    return all(one.read(start, CHUNK) == two.read(start, CHUNK)
               for start in range(0, one.size, CHUNK))


def copy_file(src: AnyPath, dst: AnyPath) -> int:
    """Copy a file atomically (from or to storage too, streamed); return its size."""
    if isinstance(dst, ObjectPath):
        source = open_source(src)
        storage().copy(source, dst)
        return source.size
    with atomic_path(dst) as tmp:
        if isinstance(src, Path):
            shutil.copyfile(src, tmp)
        else:
            source = open_source(src)
            with open(tmp, "wb", buffering=0) as out:
                source.copy_to(0, source.size, out)
        size = tmp.stat().st_size
    return size


def check_inside(dst: AnyPath, outdir: AnyPath) -> None:
    """Refuse an output path that would land outside `outdir` (through links) or on a link."""
    if isinstance(dst, ObjectPath) or isinstance(outdir, ObjectPath):
        if not (isinstance(dst, ObjectPath) and isinstance(outdir, ObjectPath)
                and dst.is_relative_to(outdir)):
            raise ModelWriteError(f"{dst}: would be written outside the output {outdir}; "
                                  "refusing")
        return  # object storage has no links
    root = Path(os.path.realpath(outdir))
    where = Path(os.path.realpath(dst.parent))
    if where != root and root not in where.parents:
        raise ModelWriteError(f"{dst}: would be written outside the output folder {outdir} "
                              f"(through a link to {where}); refusing")
    if dst.is_symlink():
        raise ModelWriteError(f"{dst}: is a symbolic link; refusing to write through it "
                              "(remove it)")
