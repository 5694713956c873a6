"""A size target's last step: the search's pick against the quantize stage's default file,
both measured as the run writes them.

A size target's trials are rounded without the calibration data
(modelpress.app.budget.settle), so that their errors compare fairly; the run
then writes the pick with gptq (its layers rounded in order where they can
be, `Trial.final`), which gains more on some allocations than on others. On
the sample transformer the pick had 1.09x the output error of `quantize
--bits 4 --calibration`, a file of the same size. So when the
default file of the quantize stage (`Choices.default_labels`: embeddings and
the head at their backup width; the widest whose file fits) differs from the
pick, both are measured as written and the better one is taken:

- rounded with the calibration data and measured on it (`Trial.final`), when
  gptq fits every tensor where the two differ on at least as many rows as it
  has inputs;
- else held out: gptq fitted on every other calibration sample and measured on
  the rest (`Trial.refit`). On the rows it fits, gptq's error understates its
  error elsewhere for such a tensor (magika's last layer, 16 rows for 512
  inputs: 0.004 on them, 0.025 on 64 other strings), and the rounding without
  data overstates it (a 3-layer test model fitted on 32 rows for 64 and 256
  inputs: 0.098 with mse, 0.034 with gptq on 256 other rows). The held-out
  models round each chosen tensor once per candidate, so this is done for models
  of at most HELD_OUT_MAX_WEIGHTS chosen weights: open_nsfw's 16 under-sampled
  tensors (4.6M weights) take 48 s of gptq on this 2-core machine, its 36
  others 17 s (a plain int4 run: 3 s). Above it they are compared as in
  `Trial.final` (those tensors rounded without the data).

The file the run writes still uses every calibration row.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from modelpress.core.budget import Allocation
from modelpress.core.candidates import underdetermined
from modelpress.core.evaluate import shared_samples
from modelpress.core.quantize.stage import Quantize
from modelpress.formats import open_model

from modelpress.app.sensitivity import OutputProbe
from modelpress.app.trial import Measured, Trial

HELD_OUT_MAX_WEIGHTS = 1 << 21
# Fewer calibration samples than this are not split (each part needs a few).
MIN_SPLIT_SAMPLES = 4


def default_fit(trial: Trial, limit: int) -> tuple[Allocation, Measured] | None:
    """The widest default file of the quantize stage (`Choices.default_labels`) that fits
    `limit` bytes, as a measured trial, or None."""
    choices, table = trial.measure.choices, trial.table
    infos = {name: trial.store.tensors[name] for name in table.names}
    widths = sorted({c.stage.bits for c in choices.candidates
                     if isinstance(c.stage, Quantize)}, reverse=True)
    for bits in widths:
        labels = choices.default_labels(bits, infos)
        if labels is None:
            continue
        chosen = [table.labels.index(labels[name]) for name in table.names]
        # The size is estimated before it is measured; the estimate's error is a few kB.
        if trial.estimate(chosen) > limit * 1.05 + 4096:
            continue
        measured = trial(chosen)
        if measured.file_bytes <= limit:
            return chosen, measured
    return None


def better_as_written(trial: Trial, contenders: Sequence[Allocation],
                      notes: list[str]) -> Allocation:
    """Of `contenders` (the search's pick first), the one with the least output error as the
    run writes it (see the module doc); the first on a tie. A line for `notes` says what was
    compared."""
    unique = list({tuple(c): list(c) for c in contenders}.values())
    if len(unique) < 2 or trial.measure.probe is None or not trial.free:
        return unique[0]
    differing = {name for name, *labels in zip(trial.table.names, *unique)
                 if len(set(labels)) > 1}
    few = [n for n in differing if underdetermined(trial.store.tensors[n])]
    weights = sum(trial.store.tensors[n].size for n in trial.table.names)
    how = "with the calibration data"
    errors = None
    if few and weights <= HELD_OUT_MAX_WEIGHTS:
        errors = _held_out(trial, unique)
        how = "held out (gptq fitted on every other calibration sample, measured on the rest)"
    if errors is None:
        errors = [trial.final(c).error for c in unique]
    errors = [np.inf if e is None else e for e in errors]
    best = min(range(len(unique)), key=lambda i: (errors[i], i))
    notes.append(f"target: output error as written, {how}: the search's pick "
                 f"{errors[0]:.4g}, the quantize stage's default file "
                 f"({_counts(trial.labels(unique[1]))}) {errors[1]:.4g}; "
                 f"{'the default' if best else 'the pick'} is written")
    return unique[best]


def _held_out(trial: Trial, contenders: list[Allocation]) -> list[float] | None:
    """Each contender's output error on every other calibration sample, rounded by gptq
    fitted on the rest; None when the samples do not split."""
    probe = trial.measure.probe
    count = shared_samples((*probe.feeds.values(), *probe.reference.values()))
    if not count or count < MIN_SPLIT_SAMPLES:
        return None
    fit, held = np.arange(0, count, 2), np.arange(1, count, 2)
    rows = trial.path.parent / "fit-rows.npz"
    np.savez(rows, **{name: value[fit] for name, value in probe.feeds.items()})
    store = open_model(trial.store.path)
    store.calibrate(rows, set(trial.table.names))
    other = OutputProbe({k: v[held] for k, v in probe.feeds.items()},
                        {k: v[held] for k, v in probe.reference.items()})
    cache: dict[tuple[str, str], Any] = {}
    return [trial.refit(c, store, other, cache).error for c in contenders]


def _counts(labels: dict[str, str]) -> str:
    return ", ".join(f"{label} {n}" for label, n in Counter(labels.values()).items())
