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
codebook entry of their own). Every "no" is refused with `order_error`,
whose hint each stage gives for the node types it cannot take
(`Stage.refusals`): the order that works, or to use one of the two per tensor.
"""

from __future__ import annotations

import dataclasses

from modelpress.core.encoded import Encoded, LowRank, Sparse
from modelpress.core.errors import OrderError
from modelpress.core.stage import Stage
from modelpress.core.tensorinfo import TensorInfo


def one_of(a: str, b: str) -> str:
    """The hint for two stages that each choose how the weights are stored."""
    return (f"use one of {a} or {b} per tensor (--include/--exclude give tensors "
            "different stages)")


def order_error(stage: Stage, encoded: Encoded, info: TensorInfo | None) -> OrderError:
    """The error for applying `stage` to a tensor already in `encoded`'s form.

    The hint is the stage's own (`Stage.refusals`) for the node that blocks it:
    the whole tensor for a stage that makes a mask or factors, else the leaf
    under any mask or factors (the kept values, or a factor).
    """
    if not any(issubclass(kind, (Sparse, LowRank)) for kind in stage.produces):
        while isinstance(encoded, (Sparse, LowRank)):
            encoded = encoded.values if isinstance(encoded, Sparse) else encoded.left
    hint = stage.refusals.get(type(encoded), "reorder the stages so this one comes first")
    name = f"tensor {info.name!r}: " if info is not None else ""
    return OrderError(
        f"{name}{stage.id} cannot follow a stage that made it {encoded.describe()}; {hint}")


def factor_info(info: TensorInfo, shape: tuple[int, ...], which: str) -> TensorInfo:
    """TensorInfo for one factor of a low-rank tensor.

    Both factors keep the matrix's channel and block axes: the left factor's
    rows are the matrix's rows and the right factor's columns its columns,
    and each is used the way the matrix was (same reduction side). The
    matrix's input statistics are not the factor's (the inner factor's
    inputs are the outer one's outputs): they are left out.
    """
    return dataclasses.replace(info, name=f"{info.name}.{which}", shape=tuple(shape),
                               input_stats=None)


def apply_to_factors(stage: Stage, encoded: LowRank, info: TensorInfo) -> LowRank:
    """`stage` applied to each factor of a low-rank tensor, with that factor's TensorInfo."""
    return LowRank(stage.apply(encoded.left, factor_info(info, encoded.left.shape, "left")),
                   stage.apply(encoded.right, factor_info(info, encoded.right.shape, "right")))
