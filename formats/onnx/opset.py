"""Raising a model's opset when an encoding needs a newer operator."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import version_converter

from modelpress.core.errors import ModelWriteError

from modelpress.formats.onnx.borrow import borrow, give_back
from modelpress.formats.onnx.check import refuse_invalid_source
from modelpress.formats.onnx.graph import opset_version


def ensure_opset(model: onnx.ModelProto, need: int, path: Path,
                 notes: list[str]) -> onnx.ModelProto:
    """The model at default-domain opset `need` or later (converted if older; a note
    says so); ModelWriteError naming the fix if the conversion fails."""
    current = opset_version(model)
    if current >= need:
        return model
    # The converter serializes the whole model and parses its result: the tensors
    # emitted so far are lent out for it, as the source's weights are (see borrow).
    light, emitted = borrow(model, location=_CONVERTING)
    try:
        converted = version_converter.convert_version(light, need)
    except Exception as exc:
        refuse_invalid_source(path)
        raise ModelWriteError(
            f"{path}: this encoding needs ONNX opset {need} (the model has {current}) and "
            f"converting the model failed ({str(exc).splitlines()[0]}); use --bits 8 "
            "--granularity channel --scale-bits 0, which needs opset 13") from None
    # The converter may pick the newest IR version; keep the lowest that opset allows.
    converted.ir_version = max(model.ir_version, _MIN_IR.get(need, converted.ir_version))
    # It also adds the shapes it inferred as value_info: they cost bytes, and they let
    # onnxruntime make fusions it does not make on the original (SkipLayerNormalization,
    # measured 8-12% slower on the sample transformer), so the model's own are kept.
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(model.graph.value_info)
    _carry_functions(model, converted, need)
    give_back(converted, emitted, _CONVERTING)
    notes.append(f"ONNX opset raised from {current} to {need} (needed by the encodings used)")
    return converted


_MIN_IR = {13: 7, 19: 9, 21: 10}
# Where tensors lent out for the version converter point (see onnx_borrow).
_CONVERTING = "<modelpress tensor lent for opset conversion>"


def _carry_functions(model: onnx.ModelProto, converted: onnx.ModelProto, opset: int) -> None:
    """Put back the model-local functions the version converter drops.

    A function must import the model's opset; the decode chains' operators
    (Cast, Reshape, Mul, bit operations...) mean the same at the new opset.
    """
    if converted.functions or not model.functions:
        return
    for function in model.functions:
        carried = converted.functions.add()
        carried.CopyFrom(function)
        for entry in carried.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
