"""Refuse a recipe whose stages cannot meet on one tensor before any model is read.

The stages themselves decide what may follow what (`Stage.refusals`, raised as
`OrderError` by their `apply`); this runs each group of stages that select
exactly the same tensors on a small probe tensor and reports the first
refusal. Stages with different --include/--exclude may never meet, so they are
left to the run, tensor by tensor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from modelpress.core.encoded import Dense, Encoded
from modelpress.core.errors import ModelpressError, OrderError
from modelpress.core.stage import SELECTION_OPTIONS, Skip, Stage
from modelpress.core.tensorinfo import TensorInfo

# A [out, in] weight large enough for every stage to apply (low-rank factors that save
# bytes, N:M groups, a codebook) and small enough to cost milliseconds.
_PROBE = TensorInfo("probe.weight", (128, 256), np.dtype(np.float32), weight_like=True,
                    channel_axis=0, block_axis=1)


def order_problem(stages: Sequence[Stage]) -> str | None:
    """Why some stages cannot all apply to one tensor in this order, or None."""
    groups: dict[tuple[object, ...], list[Stage]] = {}
    for stage in stages:
        groups.setdefault(tuple(getattr(stage, o) for o in SELECTION_OPTIONS), []).append(stage)
    values = np.random.default_rng(0).standard_normal(_PROBE.shape).astype(np.float32)
    for group in groups.values():
        problem = _first_refusal(group, values)
        if problem is not None:
            return problem
    return None


def _first_refusal(stages: list[Stage], values: np.ndarray) -> str | None:
    encoded: Encoded = Dense(values)
    for stage in stages:
        try:
            if stage.needs_prepare:
                stage = stage.prepare(lambda: iter([(_PROBE, encoded.decode())]))
            encoded = stage.apply(encoded, _PROBE)
        except OrderError as exc:
            return str(exc).removeprefix(f"tensor {_PROBE.name!r}: ")
        except (Skip, ModelpressError):  # not about the order: the run reports it per tensor
            continue
    return None
