"""onnx.checker on inputs and outputs, with errors that say whose fault a failure is."""

from __future__ import annotations

from pathlib import Path

import onnx

from modelpress.core.errors import ModelReadError, ModelWriteError

from modelpress.formats.location import AnyPath, ObjectPath
from modelpress.formats.onnx.borrow import checkable, is_borrowed
from modelpress.formats.onnx.graph import is_external, locate


def check_saved(path: Path, dst: Path, source: AnyPath | None = None) -> None:
    """Run onnx.checker's full check on a saved output (path form: external data is
    checked where it lies); raise ModelWriteError naming `dst` if it fails.

    When the check fails and the `source` model fails it too, the error names
    the source: the input is broken, not what modelpress made of it. With its
    weights in external data the proto the checker loads is small, so the
    check costs little memory whatever the model's size.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        if source is not None:
            refuse_invalid_source(source)
        raise ModelWriteError(f"{dst}: the compressed model fails onnx.checker "
                              f"({one_line(exc)}); nothing was written") from None


def check_source(path: AnyPath, model: onnx.ModelProto) -> None:
    """Refuse an input that fails onnx.checker's structural check before any work on it.

    Writing it would fail the output check anyway, unless a rewrite happened to
    drop the invalid node: then modelpress would make an output that cannot be
    decompressed back into a valid model. A model with external data is
    checked through its path, so locations resolve against its folder (the
    weights are not loaded); any other in memory, with the tensors a `borrow`
    copy borrows standing in empty (see `checkable`). A model in storage is always
    checked in memory, its external tensors standing in empty too (the checker reads
    local files only).
    """
    external = any(is_external(loc.tensor) and not is_borrowed(loc.tensor)
                   for loc in locate(model).values())
    remote = isinstance(path, ObjectPath)
    try:
        onnx.checker.check_model(str(path) if external and not remote
                                 else checkable(model, external=remote))
    except Exception as exc:
        raise ModelReadError(f"{path}: the model fails onnx.checker ({one_line(exc)}); "
                             "modelpress writes only valid models, so fix the input first") from None


def refuse_invalid_source(path: AnyPath) -> None:
    """Raise ModelReadError if the input model itself fails onnx.checker (full check).

    A model in storage is not checked here (the checker reads local files only):
    the output's failure is then reported as it is.
    """
    if isinstance(path, ObjectPath):
        return
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelReadError(f"{path}: the model fails onnx.checker ({one_line(exc)}); "
                             "modelpress writes only valid models, so fix the input first") from None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message with its line breaks folded (checker messages span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
