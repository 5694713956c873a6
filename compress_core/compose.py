"""Which stage may follow which: the refusal message for an order that makes no sense.

What composes, per tensor (row: the earlier stage, column: the later one):

| then ->     | quantize | cast | prune | lowrank | cluster |
|-------------|----------|------|-------|---------|---------|
| quantize    | no       | no   | yes   | no      | no      |
| cast        | no       | no   | yes   | no      | no      |
| prune       | yes      | yes  | yes*  | no      | yes     |
| lowrank     | yes      | yes  | no    | no      | yes     |
| cluster     | no       | no   | no    | no      | no      |

(* unstructured after unstructured; an N:M pattern must be the only prune.)
`lowrank -> quantize/cast/cluster` compresses both factors; `prune -> X`
compresses the kept weights and keeps the mask (cluster gives the zeros a
codebook entry of their own). Every "no" is refused with the message below,
which names the order that works or says to use one of the two per tensor.
"""

from __future__ import annotations

import dataclasses

from modelpress.core.encoded import Encoded, LowRank, Sparse
from modelpress.core.errors import UnsupportedTensorError
from modelpress.core.stage import Stage
from modelpress.core.tensorinfo import TensorInfo

_ONE_OF = "use one of {a} or {b} per tensor (--include/--exclude give tensors different stages)"

# (stage id, encoding class name) -> how to get what the user wanted.
_HINTS = {
    ("quantize", "Quantized"): "the tensor is already integer-coded; keep one quantize stage "
                               "per tensor (use --include/--exclude to give tensors different bits)",
    ("quantize", "Scaled"): "cast and quantize both choose how the weights are stored; "
                            + _ONE_OF.format(a="cast", b="quantize"),
    ("quantize", "Palettized"): "cluster already stores each weight as a small index; "
                                + _ONE_OF.format(a="cluster", b="quantize"),
    ("cast", "Quantized"): "quantize already stores its scales in the model's float type; "
                           + _ONE_OF.format(a="quantize", b="cast"),
    ("cast", "Scaled"): "keep one cast stage per tensor",
    ("cast", "Palettized"): "cluster keeps its codebook in the model's float type; "
                            + _ONE_OF.format(a="cluster", b="cast"),
    ("prune", "Sparse"): "use a single prune stage when it has --pattern N:M",
    ("prune", "LowRank"): "the product of two factors has no zeros to keep; "
                          + _ONE_OF.format(a="prune", b="lowrank"),
    ("prune", "Palettized"): "put prune first: prune -> cluster gives the pruned zeros an "
                             "exact codebook entry",
    ("lowrank", "Sparse"): "factors would fill in the pruned zeros; "
                           + _ONE_OF.format(a="prune", b="lowrank"),
    ("lowrank", "LowRank"): "keep one lowrank stage per tensor",
    ("lowrank", "*"): "put lowrank first: lowrank -> {prev} factors the dense weight, then "
                      "{prev} compresses both factors",
    ("cluster", "Quantized"): _ONE_OF.format(a="quantize", b="cluster"),
    ("cluster", "Scaled"): _ONE_OF.format(a="cast", b="cluster"),
    ("cluster", "Palettized"): "keep one cluster stage per tensor",
}

# Which stage produced an encoding, to name it in hints.
_MADE_BY = {"Quantized": "quantize", "Scaled": "cast", "Palettized": "cluster",
            "Sparse": "prune", "LowRank": "lowrank"}


def order_error(stage: object, encoded: Encoded, info: TensorInfo | None) -> UnsupportedTensorError:
    """The error for applying `stage` to a tensor already in `encoded`'s form."""
    stage_id = getattr(stage, "id", "this stage")
    if stage_id not in ("prune", "lowrank"):
        # The part that blocks this stage: the kept values, or a factor.
        while isinstance(encoded, (Sparse, LowRank)):
            encoded = encoded.values if isinstance(encoded, Sparse) else encoded.left
    kind = type(encoded).__name__
    hint = _HINTS.get((stage_id, kind)) or _HINTS.get((stage_id, "*"))
    if hint is None:
        hint = "reorder the stages so this one comes first"
    hint = hint.format(prev=_MADE_BY.get(kind, "the other stage"))
    name = f"tensor {info.name!r}: " if info is not None else ""
    return UnsupportedTensorError(
        f"{name}{stage_id} cannot follow a stage that made it {encoded.describe()}; {hint}")


def factor_info(info: TensorInfo, shape: tuple[int, ...], which: str) -> TensorInfo:
    """TensorInfo for one factor of a low-rank tensor.

    Both factors keep the matrix's channel and block axes: the left factor's
    rows are the matrix's rows and the right factor's columns its columns,
    and each is used the way the matrix was (same reduction side).
    """
    return dataclasses.replace(info, name=f"{info.name}.{which}", shape=tuple(shape))


def apply_to_factors(stage: Stage, encoded: LowRank, info: TensorInfo) -> LowRank:
    """`stage` applied to each factor of a low-rank tensor, with that factor's TensorInfo."""
    return LowRank(stage.apply(encoded.left, factor_info(info, encoded.left.shape, "left")),
                   stage.apply(encoded.right, factor_info(info, encoded.right.shape, "right")))
