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

from dataclasses import dataclass, replace
from typing import Sequence

from modelpress.core.encoded import Encoded, LowRank, Sparse
from modelpress.core.errors import UnsupportedTensorError
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


def order_problem(stages: Sequence[object]) -> str | None:
    """Why a sequence of stages cannot all apply to one tensor, or None if they can.

    Only stages that select exactly the same tensors (the same --include and
    --exclude) are checked against each other: those certainly meet on every
    tensor they select, so the order fails whatever the model holds. The
    forms follow the stages' `apply`: Sparse wraps the kept values, LowRank
    holds factors that later stages compress.
    """
    groups: dict[tuple[object, ...], list[object]] = {}
    for stage in stages:
        key = (getattr(stage, "include", ()), getattr(stage, "exclude", ()),
               getattr(stage, "take_all_named", False))
        groups.setdefault(key, []).append(stage)
    for group in groups.values():
        form = _Form()
        for stage in group:
            form, kind = form.then(stage)
            if kind is not None:
                stage_id = getattr(stage, "id", "this stage")
                hint = _HINTS.get((stage_id, kind)) or _HINTS.get((stage_id, "*")) \
                    or "reorder the stages so this one comes first"
                made = _MADE_BY.get(kind, "an earlier stage")
                return (f"{stage_id} cannot follow {made} on the same tensors; "
                        f"{hint.format(prev=made)}")
    return None


@dataclass(frozen=True)
class _Form:
    """The shape of a tensor's encoding: sparse wrapper, factors, and the values' kind."""

    sparse: str | None = None      # the prune pattern, when pruned
    factored: bool = False         # LowRank
    kind: str = "Dense"            # Dense, Quantized, Scaled or Palettized

    def then(self, stage: object) -> tuple[_Form, str | None]:
        """The form after `stage`, and the encoding it refuses (None if it applies)."""
        stage_id = getattr(stage, "id", "")
        made = {"quantize": "Quantized", "cast": "Scaled", "cluster": "Palettized"}
        if stage_id in made:
            return (replace(self, kind=made[stage_id]), None) if self.kind == "Dense" \
                else (self, self.kind)
        if stage_id == "lowrank":
            if self.sparse is not None:
                return self, "Sparse"
            if self.factored:
                return self, "LowRank"
            return (replace(self, factored=True), None) if self.kind == "Dense" \
                else (self, self.kind)
        if stage_id == "prune":
            pattern = getattr(stage, "pattern", "unstructured")
            if self.factored:
                return self, "LowRank"
            if self.sparse is not None and (self.sparse, pattern) != ("unstructured",) * 2:
                return self, "Sparse"
            if self.kind == "Palettized":
                return self, "Palettized"
            return replace(self, sparse=self.sparse or pattern), None
        return self, None
