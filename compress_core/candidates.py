"""What a budgeted run may choose for each tensor, and the recipe its choice becomes.

With a target, the recipe's quantize stage (a default one is added after the
other stages when there is none) is the choice: each tensor it selects gets
one candidate, either that stage at one of its bit widths (every other option
as given, so each width has its default layout, and embeddings and heads at
the chosen width too: `all_layers`), float16 (`cast --dtype fp16`), or kept as
it is (the stage left out for that tensor). Every other stage of the recipe
stays fixed and applies as it would without a target: stages before the
quantize stage (prune, lowrank) shape what each candidate encodes, stages
after it apply to the chosen encoding. cast and cluster stages also choose
how weights are stored, so a target refuses them, as it refuses a second
quantize stage (the one stage that is chosen) and --backup-bits (the search
sets each tensor's width).

The choice is written back as a recipe with one stage per candidate used,
whose `include` names its tensors exactly (glob metacharacters escaped), in
the place of the quantize stage: a recipe that reruns without any search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from modelpress.core.cast import Cast
from modelpress.core.errors import RecipeError
from modelpress.core.quantize.plan import default_method
from modelpress.core.quantize.stage import Quantize
from modelpress.core.recipe import Recipe
from modelpress.core.stage import Stage
from modelpress.core.tensorinfo import TensorInfo

DEFAULT_WIDTHS = tuple(range(2, 9))
KEPT = "kept"
FLOAT16 = "fp16"
# Group sizes each width below 8 bits also comes in (ONNX, default layout), beside its
# default (asymmetric groups of 16, 5-bit scale codes, 2-bit zero points: 4.44 bits per
# weight at 4 bits): groups of 64 with 8-bit scale codes and zero points of the width (4.19)
# and groups of 8 (4.88), steps of a quarter to half a bit between whole widths. Measured on
# magika's main convolution (gptq, output error on 64 strings): 0.033 at 4.19 bits, 0.032 at
# 4.44, 0.025 at 4.88, 0.018 at 5.44 (int5).
LAYOUT_GROUPS = (64, 8)
DEFAULT_GROUP = 16  # ONNX's below 8 bits (modelpress.core.quantize.plan)
# Stages that choose how weights are stored, as the search does.
_CHOOSING = ("cast", "cluster")


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor: a label (int4, fp16, kept) and the stage that makes it
    (None: kept as it is)."""

    label: str
    stage: Stage | None


@dataclass(frozen=True)
class Choices:
    """A recipe split around its quantize stage, and the candidates that stage may become."""

    recipe: Recipe
    position: int
    candidates: tuple[Candidate, ...]

    @property
    def chooser(self) -> Stage:
        """The quantize stage whose tensors get a choice."""
        return self.recipe.stages[self.position]

    def recipe_for(self, candidate: Candidate) -> Recipe:
        """The recipe that gives every chosen tensor this candidate."""
        stages = list(self.recipe.stages)
        if candidate.stage is None:
            del stages[self.position]
        else:
            stages[self.position] = candidate.stage
        return Recipe(stages)

    def final_recipe(self, chosen: Mapping[str, str], order: Sequence[str],
                     in_order: bool = False) -> Recipe:
        """The recipe that applies the chosen label (by tensor) without a search: one stage
        per candidate used, naming its tensors exactly, in file `order`. `in_order`: its
        quantize stages round layers in order (--sequential) as the stage given does;
        else each on its own, as the search measured them."""
        stages: list[Stage] = []
        for candidate in self.candidates:
            names = [n for n in order if chosen.get(n) == candidate.label]
            if candidate.stage is None or not names:
                continue
            changes: dict[str, Any] = {"include": tuple(escape_glob(n) for n in names),
                                       "exclude": ()}
            if in_order and isinstance(candidate.stage, Quantize):
                changes["sequential"] = self.chooser.sequential
            stages.append(dataclasses.replace(candidate.stage, **changes))
        given = list(self.recipe.stages)
        return Recipe(given[:self.position] + stages + given[self.position + 1:])

    def default_labels(self, bits: int, infos: Mapping[str, TensorInfo]
                       ) -> dict[str, str] | None:
        """The labels that write the quantize stage as given at `bits` (embeddings and the
        output head at its backup width, each width at its default layout: the stage's plan
        per tensor), or None where a width it takes is not a candidate. The quantize
        stage's default file, as a per-tensor recipe (final_recipe) that writes the same
        bytes."""
        stage = dataclasses.replace(self.chooser, bits=bits)
        known = {c.label for c in self.candidates}
        found = {name: f"int{stage.plan(info).bits}" for name, info in infos.items()}
        return found if set(found.values()) <= known else None


def choices_for(recipe: Recipe | None, widths: Sequence[int] | None,
                float16: bool = True, layouts: bool = False) -> Choices:
    """The candidates of a budgeted run of `recipe` (None: just the default quantize stage).

    `widths`: the bit widths to choose from (None: the quantize stage's own
    --bits, or 2-8 without a quantize stage); `float16`: whether fp16 is a
    candidate; `layouts`: whether each width below 8 also comes in the group
    sizes of LAYOUT_GROUPS (ONNX, when the quantize stage leaves its layout to
    the defaults). RecipeError for a recipe a target cannot take.
    """
    stages = list(recipe.stages) if recipe is not None else []
    for stage in stages:
        if stage.id in _CHOOSING:
            raise RecipeError(f"a target chooses how each tensor is stored; drop the {stage.id} "
                              "stage (fp16 and the quantize widths are its candidates)")
    found = [i for i, s in enumerate(stages) if isinstance(s, Quantize)]
    if len(found) > 1:
        raise RecipeError("a target chooses each tensor's bits in one quantize stage; give one "
                          "(with --bits A-B for the widths to choose from)")
    if found:
        position = found[0]
        given: Quantize = stages[position]
        if given.backup_bits is not None:
            raise RecipeError("quantize: --backup-bits has no effect with a target: the search "
                              "chooses each tensor's bits (drop it)")
    else:
        position = len(stages)
        given = Quantize()
        stages.append(given)
    if widths is None:
        widths = (given.bits,) if found else DEFAULT_WIDTHS
    candidates = []
    for bits in sorted(set(widths)):
        try:
            # Each tensor rounded on its own, as the search measures it.
            stage = dataclasses.replace(given, bits=bits, all_layers=True, sequential=False)
        except RecipeError as exc:
            raise RecipeError(f"{exc} (at width {bits} of the widths to choose from; narrow "
                              "them with --bits A-B)") from None
        groups = LAYOUT_GROUPS if layouts and bits < 8 and _default_layout(given) else ()
        # Fewest bytes first (the order proxy ratios are interpolated in).
        candidates += [_variant(stage, g) for g in groups if g > DEFAULT_GROUP]
        candidates.append(Candidate(f"int{bits}", stage))
        candidates += [_variant(stage, g) for g in groups if g < DEFAULT_GROUP]
    if float16:
        candidates.append(Candidate(FLOAT16, Cast(dtype="fp16", include=given.include,
                                                  exclude=given.exclude,
                                                  take_all_named=given.take_all_named)))
    candidates.append(Candidate(KEPT, None))
    return Choices(Recipe(stages), position, tuple(candidates))


def _variant(stage: Quantize, group: int) -> Candidate:
    return Candidate(f"int{stage.bits}g{group}", dataclasses.replace(stage, group_size=group))


def _default_layout(stage: Quantize) -> bool:
    """Whether a quantize stage leaves its layout (groups, scale codes, zero points) to the
    defaults, so that the search may choose it."""
    return (stage.granularity in (None, "group") and stage.group_size is None
            and stage.scale_bits is None and stage.zero_bits is None
            and stage.super_block is None and stage.scheme is None)


def data_free(recipe: Recipe) -> Recipe:
    """`recipe` with each quantize stage rounding without calibration data (mse below 8
    bits, rtn at 8): same layout and bytes as with gptq, an error that does not depend on
    the samples gptq fits, and a fraction of its time (see modelpress.app.sensitivity)."""
    return Recipe([dataclasses.replace(stage, method=default_method(stage.bits))
                   if isinstance(stage, Quantize) and stage.method in (None, "gptq") else stage
                   for stage in recipe.stages])


def underdetermined(info: TensorInfo) -> bool:
    """Whether gptq would fit this tensor on fewer calibration rows than it has inputs: its
    error on those rows then understates its error on others (magika's last layer, 16 rows
    for 512 inputs, int4: 0.004 on them, 0.025 on 64 other strings, where mse rounding
    gives 0.024 and 0.026), so the search measures it rounded without them."""
    stats = info.input_stats
    return (stats is not None and stats.second_moments is not None
            and stats.samples < stats.mean.shape[-1])


def parse_widths(text: str) -> tuple[int, ...]:
    """Bit widths from 'N' or 'A-B' (2 <= A <= B <= 8); ValueError otherwise."""
    low, dash, high = str(text).strip().partition("-")
    try:
        a, b = int(low), int(high) if dash else int(low)
    except ValueError:
        raise ValueError(f"{text!r} is not a width or a range of widths such as 4 or "
                         "2-8") from None
    if not 2 <= a <= b <= 8:
        raise ValueError(f"{text!r}: widths are 2 to 8 bits, low to high (such as 2-8 or 4-8)")
    return tuple(range(a, b + 1))


def escape_glob(name: str) -> str:
    """A glob that matches exactly `name`: *, ? and [ each inside a set of its own."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def squared_error(reference: np.ndarray, approx: np.ndarray, info: TensorInfo) -> float:
    """The squared relative error a layer's output gets from using `approx` for its weight
    `reference`: weighted by each input channel's energy (mean^2 + variance over the
    calibration data) where `info.input_stats` has them, else the plain weight error."""
    ref = np.asarray(reference, dtype=np.float32)
    diff = np.asarray(approx, dtype=np.float32) - ref
    energy = _input_energy(info, ref.shape)
    if energy is None:
        num, den = float(np.vdot(diff, diff)), float(np.vdot(ref, ref))
    else:
        num = float((np.square(diff) * energy).sum(dtype=np.float64))
        den = float((np.square(ref) * energy).sum(dtype=np.float64))
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def _input_energy(info: TensorInfo, shape: tuple[int, ...]) -> np.ndarray | None:
    """Each input's energy, shaped to broadcast against the weight, or None."""
    stats = info.input_stats
    if stats is None or not shape:
        return None
    energy = (np.maximum(stats.var, 0) + np.square(stats.mean)).astype(np.float32)
    axis = info.block_axis
    if axis is not None and energy.size == shape[axis]:
        view = [1] * len(shape)
        view[axis] = energy.size
        return energy.reshape(view)
    channel = info.channel_axis
    if channel == 0 and len(shape) > 2 and energy.size == int(np.prod(shape[1:])):
        return energy.reshape((1,) + tuple(shape[1:]))  # im2col order: (C, kh, kw)
    return None
