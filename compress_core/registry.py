"""Every stage by id: the one place that lists the stages."""

from __future__ import annotations

from typing import Any

from modelpress.core.cast import Cast
from modelpress.core.cluster import Cluster
from modelpress.core.errors import RecipeError
from modelpress.core.lowrank import Factorize
from modelpress.core.prune import Prune
from modelpress.core.quantize.stage import Quantize
from modelpress.core.stage import Stage

REGISTRY: dict[str, type[Stage]] = {cls.id: cls for cls in (Quantize, Cast, Cluster, Factorize, Prune)}


def stage_class(stage_id: str) -> type[Stage]:
    """The stage class for an id; an unknown id lists the known ones."""
    try:
        return REGISTRY[stage_id]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise RecipeError(f"unknown stage {stage_id!r}; known stages: {known}") from None


def stage_from_config(config: dict[str, Any]) -> Stage:
    """Build the stage a config mapping names by its `id`."""
    if "id" not in config:
        raise RecipeError(f"stage {dict(config)!r} has no id; known stages: {', '.join(sorted(REGISTRY))}")
    return stage_class(config["id"]).from_config(config)
