"""Which stage may follow which: the refusal message for an order that makes no sense."""

from __future__ import annotations

from .encoded import Encoded
from .errors import UnsupportedTensorError
from .tensorinfo import TensorInfo

# (stage id, encoding class name) -> how to get what the user wanted.
_HINTS = {
    ("quantize", "Quantized"): "the tensor is already integer-coded; keep one quantize stage "
                               "per tensor (use --include/--exclude to give tensors different bits)",
}


def order_error(stage: object, encoded: Encoded, info: TensorInfo | None) -> UnsupportedTensorError:
    """The error for applying `stage` to a tensor already in `encoded`'s form."""
    stage_id = getattr(stage, "id", "this stage")
    kind = type(encoded).__name__
    hint = _HINTS.get((stage_id, kind), "reorder the stages so this one comes first")
    name = f"tensor {info.name!r}: " if info is not None else ""
    return UnsupportedTensorError(
        f"{name}{stage_id} cannot follow a stage that made it {encoded.describe()}; {hint}")
