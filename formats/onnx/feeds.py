"""Evaluation inputs and labels from files: .npz archives of arrays by input name, checked
from their headers before anything is loaded."""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from modelpress.core.errors import InputDataError
from modelpress.formats.onnx.dims import Feeds, input_specs

# Evaluation inputs (all arrays, in memory) larger than this are refused unless the
# caller raises it (--max-input-size): both models run on them, and their
# activations are a multiple of them.
MAX_INPUT_BYTES = 64 << 20


def load_inputs(model: onnx.ModelProto, path: Path, max_bytes: int = MAX_INPUT_BYTES) -> Feeds:
    """Arrays by input name from an .npz file (never unpickled), checked against the model."""
    arrays = _load_npz(path, max_bytes)
    specs = {s.name: s for s in input_specs(model)}
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise InputDataError(f"{path}: no array for model input {missing[0]!r} (the file has "
                             f"{', '.join(sorted(arrays)) or 'none'}; the model needs "
                             f"{', '.join(specs)})")
    extra = [n for n in arrays if n not in specs]
    if extra:
        raise InputDataError(f"{path}: array {extra[0]!r} is not an input of the model "
                             f"(its inputs: {', '.join(specs)})")
    feeds = {}
    for name, spec in specs.items():
        array = arrays[name]
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu"
                                                        and spec.dtype.kind in "iu"):
            raise InputDataError(f"{path}: array {name!r} is {array.dtype}, the model input is "
                                 f"{spec.dtype}; save it with that dtype")
        if array.ndim != len(spec.dims):
            raise InputDataError(f"{path}: array {name!r} has shape {list(array.shape)}, the "
                                 f"model input has {len(spec.dims)} dims {list(spec.dims)}")
        if array.size == 0:  # nothing to compare: every statistic would be NaN
            raise InputDataError(f"{path}: array {name!r} has shape {list(array.shape)}, no "
                                 "samples; give at least one")
        feeds[name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    return feeds


def load_labels(path: Path, max_bytes: int = MAX_INPUT_BYTES) -> np.ndarray:
    """Integer class labels from an .npy file (never unpickled)."""
    _check_regular(path)
    _check_npy_size(path, max_bytes)
    try:
        labels = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputDataError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iuf":
        raise InputDataError(f"{path}: labels must be an integer array of class indices")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise InputDataError(f"{path}: labels must be whole class indices")
        labels = labels.astype(np.int64)
    return labels


def _check_regular(path: Path) -> None:
    """Refuse a pipe, socket or device: reading one can block forever."""
    if Path(path).exists() and not Path(path).is_file():
        raise InputDataError(f"{path}: not a regular file (a pipe, socket, device or folder); "
                             "give the file itself")


def _load_npz(path: Path, max_bytes: int = MAX_INPUT_BYTES) -> dict[str, np.ndarray]:
    _check_regular(path)
    if Path(path).is_file():
        if not zipfile.is_zipfile(path):  # empty, a plain .npy, or anything else
            raise InputDataError(f"{path}: expected an .npz archive of arrays by input name "
                                 "(numpy.savez)")
        _check_npz_sizes(path, max_bytes)
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise InputDataError(f"{path}: expected an .npz archive of arrays by input name")
            return {name: data[name] for name in data.files}
    except InputDataError:
        raise
    except FileNotFoundError:
        raise InputDataError(f"{path}: no such file") from None
    except AttributeError:  # np.load of a plain .npy returns an array without __enter__
        raise InputDataError(f"{path}: expected an .npz archive of arrays by input name") from None
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path}: not a readable .npz file ({exc})") from None


def _check_npz_sizes(path: Path, max_bytes: int) -> None:
    """Refuse an archive whose arrays, as their headers claim, exceed `max_bytes` in memory
    (checked before any is loaded: a few compressed bytes can claim terabytes)."""
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                with archive.open(member) as fh:
                    total += _npy_nbytes(fh)
    except InputDataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, a bad .npy header, ...
        raise InputDataError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    if total > max_bytes:
        raise InputDataError(f"{path}: its arrays take {megabytes(total)} in memory, over the "
                             f"{megabytes(max_bytes)} limit for evaluation inputs; use fewer samples "
                             "or raise --max-input-size")


def _check_npy_size(path: Path, max_bytes: int) -> None:
    """Refuse an .npy file whose header claims more than `max_bytes`, or more than it holds."""
    if not Path(path).is_file():
        return
    try:
        with open(path, "rb") as fh:
            nbytes = _npy_nbytes(fh)
            held = Path(path).stat().st_size - fh.tell()
    except Exception as exc:
        raise InputDataError(f"{path}: not a readable .npy array ({first_line(exc)})") from None
    if nbytes > max_bytes:
        raise InputDataError(f"{path}: its array takes {megabytes(nbytes)} in memory, over the "
                             f"{megabytes(max_bytes)} limit for evaluation inputs; raise "
                             "--max-input-size")
    if nbytes > held:
        raise InputDataError(f"{path}: not a readable .npy array (its header claims {nbytes} "
                             f"bytes, the file holds {held})")


def _npy_nbytes(fh: Any) -> int:
    """Bytes of the array an .npy stream holds, from its header alone."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return math.prod(shape) * dtype.itemsize


def megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


def listed_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())


def first_line(exc: BaseException) -> str:
    """An error's first line, without onnxruntime's status prefix."""
    text = str(exc).strip()
    # onnxruntime prefixes its messages with "[ONNXRuntimeError] : 1 : FAIL : ".
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__
