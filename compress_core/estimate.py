"""Expected output size of a recipe on a model, from tensor headers alone (for --dry-run).

An estimate, not a measurement: for every tensor the recipe selects, the bits
each element will take (codes at the recipe's bit width in the storage the
format uses, cast values at their float width, codebook indices, kept values
and a 1-bit mask after pruning where the format stores sparsity, the two
factors of a low-rank stage given --rank or --rank-ratio, plus scales, zero
points and codebooks spread over their elements) times its element count;
everything else keeps its bytes. Container overhead (ONNX nodes, headers) is
not counted. Stages without a rule (lowrank --energy, whose rank depends on
the data) are assumed to leave the size unchanged, and the estimate says so.
Stages that choose part of a layout from the data (quantize's 8-bit group
sizes in ONNX, see compress_core/quantize/grouping.py) are estimated with a
rule of thumb (the longest groups it may choose, max(16, K/5) inputs up to
128: an underestimate by up to about 2%), and the estimate names them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from modelpress.core.pipeline import Options, plan
from modelpress.core.recipe import Recipe
from modelpress.core.sizing import ElementSize, value_bits_of
from modelpress.core.stage import Stage
from modelpress.core.tensorinfo import TensorInfo


@dataclass
class Estimate:
    """Bytes on disk now and the estimated bytes after compression."""

    bytes_before: int
    bytes_after: int
    tensors: int
    unknown_stages: list[str] = field(default_factory=list)
    # Stages whose layout depends on the values: their sizes are a rule of thumb's.
    from_values: list[str] = field(default_factory=list)


def estimate(store: Any, recipe: Recipe, options: Options = Options()) -> Estimate:
    """Estimate the output size of `recipe` on an opened model, reading no tensor data."""
    unknown: list[str] = []
    guessed: list[str] = []
    before = after = count = 0
    for name, stages in plan(store, recipe, options).items():
        info = store.tensors[name]
        if not info.is_float or info.size == 0:
            continue
        bits = element_bits(info, stages, store.format, unknown, guessed)
        before += info.nbytes
        after += math.ceil(info.size * bits / 8)
        count += 1
    return Estimate(store.file_bytes, store.file_bytes - before + after, count, unknown, guessed)


def element_bits(info: TensorInfo, stages: list[Stage], fmt: str, unknown: list[str],
                 guessed: list[str] | None = None) -> float:
    """Estimated stored bits per element of a tensor after `stages`, in format `fmt`.

    Each stage estimates from what the stages before it leave
    (`Stage.estimate_size`); one without a rule leaves the size as it is and
    is added to `unknown`; one that chooses its layout from the values is
    added to `guessed`.
    """
    size = ElementSize(value_bits_of(info))
    for stage in stages:
        after = stage.estimate_size(size, info)
        if after is not None:
            if after.from_values and not size.from_values and guessed is not None \
                    and stage.id not in guessed:
                guessed.append(stage.id)
            size = after
        elif stage.id not in unknown:
            unknown.append(stage.id)   # e.g. lowrank --energy: the rank depends on the data
    value_bits = size.value_bits
    if size.kept < 1.0 and fmt == "safetensors":
        # Sparse layouts store kept values and a 1-bit mask, unless dense is smaller.
        value_bits = min(value_bits, size.kept * value_bits + 1.0)
    return value_bits * size.stored + size.side
