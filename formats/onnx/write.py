"""Writing ONNX models tensor by tensor, with weights inline or as external data.

A large model (an input of EXTERNAL_FROM bytes or more, any output over
protobuf's 2 GB limit, or any model with `--external-data always`) is written
with its weights as external data: next to `OUT.onnx` goes `OUT.onnx.data`,
referenced by its bare name. Each encoded tensor's new
initializers go to the data file as soon as they are made, and the input's
untouched external tensors are copied into it by the kernel, chunk by chunk,
so the model proto in memory holds names and small tensors only. Both files
are staged in a hidden folder beside the output, checked there with
onnx.checker (path form, so external data is checked where it will live),
and renamed into place only when complete: the data file first, the model
last (an old model at the output name is removed before either rename, so
it is never paired with new data), all under a lock on the output folder so
that two runs writing the same output never pair one's model with the
other's data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import onnx

from modelpress.core.errors import ModelReadError, ModelWriteError

from modelpress.formats.atomic import (TMP_SUFFIX, atomic_path, commit_lock, fsync_dir, hold, output_mode,
                                        raise_write_error, remove_stale, temp_prefix)
from modelpress.formats.location import AnyPath
from modelpress.formats.onnx.check import check_saved
from modelpress.formats.onnx.graph import external_data_file, graphs, is_external, locate
from modelpress.formats.onnx.names import data_name
from modelpress.formats.onnx.options import EXTERNAL_DATA_MODES
from modelpress.formats.onnx.tensors import inline_tensor
from modelpress.formats.source import open_source

MODES = EXTERNAL_DATA_MODES
# Tensors smaller than this stay in the model file (onnx.save's default threshold).
EXTERNAL_MIN_BYTES = 1024
# Tensors of at least ALIGN_FROM bytes start on an ALIGNMENT boundary, so
# onnxruntime can map them from the file instead of copying (4 KiB pages on
# Linux, 64 KiB allocation granularity on Windows).
ALIGN_FROM = 1 << 20
ALIGNMENT = 1 << 16
PROTOBUF_LIMIT = 2**31 - 1
# "auto" writes external data for inputs of at least this many bytes (model and
# data files): below it the output is one file, held in memory while it is saved.
EXTERNAL_FROM = 512 * 2**20


class ExternalData:
    """The external data file of an output model; tensors are appended as they come."""

    def __init__(self, path: Path, location: str) -> None:
        self.path, self.location = Path(path), location
        self._file: BinaryIO = open(self.path, "wb", buffering=0)
        self.size = 0
        self.written: set[str] = set()  # names of the tensors this file holds

    def close(self) -> None:
        """Flush the file to disk and close it."""
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()

    def move(self, tensor: onnx.TensorProto) -> None:
        """Move a tensor's raw_data into the file (tensors under EXTERNAL_MIN_BYTES stay)."""
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
            return
        data = tensor.raw_data
        offset = self._place(len(data))
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += self._file.write(view[written:])
        self.size += len(data)
        del view, data
        tensor.ClearField("raw_data")
        self._point(tensor, offset, written)

    def copy(self, tensor: onnx.TensorProto, model_path: AnyPath) -> None:
        """Point an external tensor of the input model at a copy of its bytes in this file."""
        file, start, length = external_data_file(model_path, tensor)
        source = open_source(file)
        if length is None:
            length = source.size - start
        offset = self._place(length)
        try:
            source.copy_to(start, length, self._file)
        except EOFError:
            raise ModelReadError(f"{model_path}: tensor {tensor.name!r}: external data file "
                                 "shrank while it was copied") from None
        self.size += length
        self._point(tensor, offset, length)

    def _place(self, nbytes: int) -> int:
        if nbytes >= ALIGN_FROM and self.size % ALIGNMENT:
            pad = ALIGNMENT - self.size % ALIGNMENT
            self._file.write(b"\0" * pad)
            self.size += pad
        return self.size

    def _point(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        self.written.add(tensor.name)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(length))):
            tensor.external_data.add(key=key, value=value)


def between_renames() -> None:
    """Called between the data file's rename and the model's; does nothing.

    A test hook: the race test replaces it with a delay to widen the window
    in which a second writer of the same output could interleave.
    """


class Staging:
    """Where an output with external data is made: a hidden folder beside the output.

    Created on first use of `open_data`; an output without a data file never
    needs it and is written with `atomic_path` like any single file.
    """

    MODEL = ".model.onnx"  # hidden: never mistaken for an output while it is made

    def __init__(self, dst: Path) -> None:
        self.dst = Path(dst)
        self.folder: Path | None = None
        self.data: ExternalData | None = None
        self._lock: int | None = None  # an open descriptor of the folder, locked

    @property
    def model_path(self) -> Path:
        assert self.folder is not None
        return self.folder / self.MODEL

    def open_data(self) -> ExternalData:
        """The data file (the folder and file are created on first use)."""
        if self.data is None:
            remove_stale(self.dst)
            try:
                self.folder = Path(tempfile.mkdtemp(prefix=temp_prefix(self.dst),
                                                    suffix=TMP_SUFFIX, dir=self.dst.parent))
                self._lock = os.open(self.folder, os.O_RDONLY)
                hold(self._lock)  # marks the folder as a live run's for `remove_stale`
            except OSError as exc:
                raise ModelWriteError(f"{self.dst}: cannot create the output "
                                      f"({exc.strerror or exc})") from None
            name = data_name(self.dst)
            self.data = ExternalData(self.folder / name, name)
        return self.data

    def commit(self) -> None:
        """Rename the staged data file, then the model, into place (if anything is staged)."""
        if self.data is None:
            return
        self.data.close()
        with open(self.model_path, "rb+") as fh:
            os.fsync(fh.fileno())
        final_data = self.dst.parent / self.data.location
        os.chmod(self.data.path, output_mode(final_data))
        os.chmod(self.model_path, output_mode(self.dst))
        with commit_lock(self.dst.parent):  # another run's renames never interleave
            if self.dst.exists() or self.dst.is_symlink():
                self.dst.unlink()  # never pair an old model with the new data
            os.replace(self.data.path, final_data)
            between_renames()
            os.replace(self.model_path, self.dst)
        fsync_dir(self.dst.parent)

    def discard(self) -> None:
        """Remove everything staged."""
        if self.data is not None:
            with contextlib.suppress(OSError):
                self.data._file.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Drop the folder's lock (after the folder is gone)."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock)
            self._lock = None


@contextlib.contextmanager
def staged(dst: Path) -> Iterator[Staging]:
    """A Staging that is committed when the block succeeds and discarded otherwise."""
    stage = Staging(dst)
    try:
        yield stage
        stage.commit()
    except BaseException as exc:
        stage.discard()
        raise_write_error(dst, exc)
        raise
    finally:
        if stage.folder is not None:
            shutil.rmtree(stage.folder, ignore_errors=True)
        stage.release()


def place_remaining(model: onnx.ModelProto, source: AnyPath, data: ExternalData | None) -> None:
    """Give every tensor still pointing at the input's external data a home in the output.

    With a data file, the bytes are copied into it (and inline tensors of at
    least EXTERNAL_MIN_BYTES moved there too); without one, they are read into
    the model (it must then stay under 2 GB).
    """
    for location in locate(model).values():
        tensor = location.tensor
        if data is None:
            if is_external(tensor):
                tensor.CopyFrom(inline_tensor(source, tensor))
        elif tensor.name in data.written:
            continue
        elif is_external(tensor):
            data.copy(tensor, source)
        elif location.node is None:  # Constant nodes keep their value inline, as onnx.save does
            data.move(tensor)


def wants_external(mode: str, input_bytes: int) -> bool:
    """Whether an output is written with a data file from the start: "always", or with
    "auto" when the input (model and data files) has at least EXTERNAL_FROM bytes.

    ("auto" and "always" also move the weights out at the end when the model
    would pass protobuf's 2 GB limit; see `save_model`.)
    """
    if mode not in MODES:
        raise ValueError(f"external data mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode == "always" or (mode == "auto" and input_bytes >= EXTERNAL_FROM)


def save_model(model: onnx.ModelProto, dst: Path, stage: Staging, source: AnyPath | None,
               mode: str) -> int:
    """Save and check the output; return its size (model and data file).

    Without a data file the model goes to `dst` atomically (unless it is over
    protobuf's limit: then, unless `mode` is "never", its weights move to a
    data file first). With one, the model is saved into the stage, and
    `staged` renames both into place when its block ends.
    """
    # Serialized once, for the size test and the file (ByteSize costs a serialization).
    serialized = _serialized(model) if stage.data is None else None
    if stage.data is None and serialized is None:
        if mode == "never":
            raise ModelWriteError(f"{dst}: the compressed model is over 2 GB, protobuf's limit; "
                                  "write its weights as external data (--external-data auto)")
        data = stage.open_data()
        for location in locate(model).values():
            if location.node is None:
                data.move(location.tensor)
    if stage.data is None:
        with atomic_path(dst) as tmp:
            _save_serialized(model, serialized, tmp)
            check_saved(tmp, dst, source)
            size = tmp.stat().st_size
        return size
    onnx.save_model(model, str(stage.model_path))
    stage.data.close()
    check_saved(stage.model_path, dst, source)
    return stage.model_path.stat().st_size + stage.data.path.stat().st_size


def _serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None if they would pass protobuf's 2 GB limit."""
    try:
        data = model.SerializeToString()
    except ValueError:  # protobuf refuses to serialize a message over 2 GB
        return None
    return data if len(data) <= PROTOBUF_LIMIT else None


def _save_serialized(model: onnx.ModelProto, serialized: bytes, path: Path) -> None:
    """What onnx.save_model(model, path) does, with the model already serialized."""
    # onnx.save_model first writes out tensors marked external that still hold
    # raw_data. The writer leaves none (it inlines or moves every tensor it
    # locates), but a model that has some anyway is saved as onnx would.
    if any(t.data_location == onnx.TensorProto.EXTERNAL and t.HasField("raw_data")
           for t in _all_tensors(model)):
        onnx.save_model(model, str(path))
        return
    with open(path, "wb") as fh:
        fh.write(serialized)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of every graph."""
    for graph in graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


__all__ = ["ALIGNMENT", "EXTERNAL_MIN_BYTES", "ExternalData", "MODES", "Staging", "data_name",
           "place_remaining", "save_model", "staged", "wants_external"]
