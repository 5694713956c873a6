"""Model formats: open ONNX or safetensors models as stores of named tensors, and write them."""

from __future__ import annotations

import os
from pathlib import Path

from modelpress.core.errors import ModelReadError, ModelWriteError
from modelpress.core.store import TensorStore, WriteResult

from modelpress.formats.location import (AnyPath, ObjectPath, file_size, is_dir, is_file, location,
                                         storage)
from modelpress.formats.onnx.names import data_name
from modelpress.formats.safetensors.sharded import INDEX_SUFFIX, ShardedStore, is_index
from modelpress.formats.safetensors.store import SafetensorsStore
from modelpress.formats.safetensors.store import write_decompressed as write_decompressed_file
from modelpress.formats.safetensors.sharded import write_decompressed as write_decompressed_sharded

# The ONNX subpackage is imported only when an .onnx model is opened or written:
# it imports onnx, which costs 0.7 s (its ml_dtypes import), and a safetensors
# run never needs it.
Store = TensorStore
SUFFIXES = {".onnx": "onnx", ".safetensors": "safetensors"}


def format_of(path: AnyPath) -> str | None:
    """'onnx' or 'safetensors' from the file name (a sharded index is safetensors), or None."""
    if is_index(path):
        return "safetensors"
    return SUFFIXES.get(location(path).suffix.lower())


def find_index(folder: AnyPath) -> AnyPath | None:
    """A folder's sharded-checkpoint index, or None.

    `model.safetensors.index.json` if present, else the only `*.safetensors.index.json`.
    """
    preferred = folder / f"model{INDEX_SUFFIX}"
    if is_file(preferred):
        return preferred
    if isinstance(folder, ObjectPath):
        found = [p for p in storage().walk(folder) if is_index(p) and p.parent == folder]
    else:
        found = sorted(p for p in folder.glob(f"*{INDEX_SUFFIX}") if p.is_file())
    return found[0] if len(found) == 1 else None


def open_model(path: str | os.PathLike | AnyPath) -> Store:
    """Open a model file (a path, or a URL of an object in storage: read by ranges, never
    downloaded whole) for reading; raise ModelReadError with the fix if it cannot be."""
    path = location(path)
    try:
        path = _model_file(path) if isinstance(path, Path) else _model_object(path)
        fmt = format_of(path)
        if fmt is None:
            raise ModelReadError(f"{path}: unknown model format; modelpress reads .onnx and "
                                 ".safetensors files")
        if fmt == "onnx" and isinstance(path, Path):
            check_onnx_name(path)
        if file_size(path) == 0:
            raise ModelReadError(f"{path}: file is empty")
        if is_index(path):
            return ShardedStore(path)
        if fmt == "onnx":
            from modelpress.formats.onnx.store import OnnxStore  # imports onnx: see above
            return OnnxStore(path)
        return SafetensorsStore(path)
    except OSError as exc:  # unreadable, a name too long, an I/O error
        raise ModelReadError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _model_file(path: Path) -> Path:
    """The model file a local path names (a folder: its sharded checkpoint's index)."""
    if not path.exists():
        raise ModelReadError(f"{path}: no such file")
    if path.is_dir():
        index = find_index(path)
        if index is None:
            raise ModelReadError(f"{path}: is a folder without a sharded checkpoint index "
                                 f"(*{INDEX_SUFFIX}); give a .onnx or .safetensors file, or "
                                 "use `modelpress compress DIR -o OUTDIR` for a whole folder")
        path = index
    if not path.is_file():  # reading a FIFO blocks until a writer comes: maybe forever
        raise ModelReadError(f"{path}: not a regular file (a pipe, socket or device); "
                             "give the model file itself")
    return path


def _model_object(path: ObjectPath) -> AnyPath:
    """The model object a URL names (a prefix: its sharded checkpoint's index)."""
    if is_file(path):
        return path
    index = find_index(path) if is_dir(path) else None
    if index is None:
        raise ModelReadError(f"{path}: no such object" if not is_dir(path) else
                             f"{path}: is a folder without a sharded checkpoint index "
                             f"(*{INDEX_SUFFIX}); give a .onnx or .safetensors object, or "
                             "use `modelpress compress PREFIX -o OUTPREFIX` for a whole folder")
    return index


def same_file(a: str | os.PathLike | ObjectPath, b: str | os.PathLike | ObjectPath) -> bool:
    """True when two paths name one file: equal once resolved (symbolic links
    followed) or, for existing files, the same inode (hard links); objects in
    storage when their URLs are equal."""
    if isinstance(a, ObjectPath) or isinstance(b, ObjectPath):
        return a == b
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except RuntimeError:  # a loop of symbolic links: it names no file
        return False
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_onnx_name(path: Path, what: str = "") -> None:
    """Refuse an ONNX path that is not UTF-8 text: onnx.checker and onnxruntime take paths
    as UTF-8 strings and cannot open one (they would seem to fail on the model itself)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise (ModelWriteError if what else ModelReadError)(
            f"{path}: the {what or 'file'} name is not valid UTF-8; onnx and onnxruntime cannot "
            "open such a path (rename it)") from None


def check_output_path(store: Store, dst: AnyPath, *, require_same_format: bool = True) -> None:
    """Refuse outputs that would overwrite the input (or its data files) or change the format."""
    dst = location(dst)
    try:
        _check_output_path(store, dst, require_same_format)
    except OSError as exc:  # a name too long, a folder we may not look into
        raise ModelWriteError(f"{dst}: cannot write here ({exc.strerror or exc})") from None


def _check_output_path(store: Store, dst: AnyPath, require_same_format: bool) -> None:
    # (a local path that cannot be looked at raises OSError: "cannot write here")
    if dst.is_dir() if isinstance(dst, Path) else is_dir(dst):
        raise ModelWriteError(f"{dst}: is a folder; give an output file name")
    if same_file(dst, store.path):
        raise ModelWriteError(f"{dst}: output is the input file; choose another output path "
                              "(modelpress never modifies its input)")
    for data in store.data_files:
        if same_file(dst, data):
            raise ModelWriteError(f"{dst}: output is {data.name}, an external data file of the "
                                  "input; choose another output path (modelpress never modifies "
                                  "its input)")
    if store.format == "onnx":  # an ONNX output may get a data file beside it
        if isinstance(dst, Path):
            check_onnx_name(dst, "output")
        beside = dst.parent / data_name(dst)
        for data in [store.path, *store.data_files]:
            if same_file(beside, data):
                raise ModelWriteError(f"{dst}: the output's data file {beside.name} would replace "
                                      f"{data.name}, a file of the input; choose another output "
                                      "path (modelpress never modifies its input)")
    fmt = format_of(dst)
    if store.sharded != is_index(dst) and fmt == store.format:
        what = ("a sharded checkpoint is written as shards plus an index: name the output "
                f"*{INDEX_SUFFIX}" if is_index(store.path) else
                f"a single safetensors file is written as one file, not as *{INDEX_SUFFIX}")
        raise ModelWriteError(f"{dst}: {what}")
    if require_same_format and fmt != store.format:
        suffix = ".onnx" if store.format == "onnx" else ".safetensors"
        raise ModelWriteError(f"{dst}: output must be a {suffix} file like the input "
                              f"(modelpress does not convert between formats)")
    if isinstance(dst, Path) and not dst.parent.is_dir():
        raise ModelWriteError(f"{dst}: folder {dst.parent} does not exist")


def write_decompressed(store: Store, dst: Path) -> WriteResult:
    """Write the model with every compressed tensor restored to dense floats."""
    if isinstance(store, ShardedStore):
        return write_decompressed_sharded(store, dst)
    if isinstance(store, SafetensorsStore):
        return write_decompressed_file(store, dst)
    from modelpress.formats.onnx.restore import write_decompressed as write_onnx  # imports onnx
    return write_onnx(store, dst)


__all__ = ["SafetensorsStore", "ShardedStore", "Store", "check_onnx_name", "check_output_path",
           "find_index", "format_of", "open_model", "same_file", "write_decompressed"]
