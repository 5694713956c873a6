"""What each candidate encoding of each tensor costs: exact bytes and output error.

For a budgeted run (modelpress.app.budget), every tensor the quantize stage
selects is encoded with every candidate, through the same pipeline the final
run uses (fixed stages apply as they will): the stored bytes are exact. The
rounding is the one without calibration data (`candidates.data_free`: mse,
rtn at 8 bits), on the layout gptq also uses: gptq would take most of the
search's time (open_nsfw: 22 s a width against 0.5 s), and its error on the
samples it fitted understates it where they do not span a layer's inputs
(magika's last layer, 16 strings for 512 inputs: 0.004 there, 0.025 on 64
others). Its error is estimated three ways, best first:

- measured: the model run on the search's inputs with only that tensor
  replaced by its decoded candidate (`OutputProbe`: one onnxruntime session
  whose weights are inputs), as the squared relative error of each signal,
  summed: an output, or the logits before a final softmax
  (modelpress.formats.onnx.run.signals);
- scaled proxy: the weight error weighted by each input channel's energy
  (calibration statistics where they exist, else the plain weight error),
  times this tensor's measured ratio of output error to proxy (between two
  measured widths interpolated in log; beyond them, the nearest one's ratio
  times how the ratio changes between those widths on the tensors measured
  at both; for a tensor measured at no width, the median of the others);
- proxy alone (nothing measured: safetensors, or no inputs to run).

Runs are planned within SENSITIVITY_MACS multiply-adds, counted from the
shapes one run's matrix products see
(modelpress.formats.onnx.work_estimate): the same number of runs on every
machine and at any load, so the same model and inputs give the same recipe.
(They were planned within 60 s of timed runs before: open_nsfw got 88 to 269
measured, depending on the load, and its recipe for --target-error 0.01
ranged from 0.905x to 1.151x of the smallest uniform file meeting it.)
SWEEP_SHARE of them on the candidates of MEASURE_ORDER (4 bits first, then 2
and 3 bits, where the error departs most from the proxy, then the others),
each over the tensors largest first; the rest on the candidates allocations
choose that are not measured yet (`Sensitivity.measure`). magika 1.0.3
(3 weights, 16 calibration strings: 5.9 GMAC a run) gets every candidate
measured; open_nsfw (52 weights, 4 images: 4.3 GMAC) is planned 2^40 / 4.27e9
= 257 runs. MAX_SECONDS of wall time bounds them besides.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from modelpress.core.budget import Option
from modelpress.core.candidates import KEPT, Choices, data_free, escape_glob, squared_error
from modelpress.core.evaluate import shared_samples
from modelpress.core.metrics import compare
from modelpress.core.pipeline import Options, encode_stream, plan
from modelpress.core.recipe import Recipe
from modelpress.core.store import Progress, TensorStore

SENSITIVITY_MACS = 1 << 40
"""Multiply-adds of the measuring runs: 50-55 s of them at the 20-22 GMAC/s this 2-core
machine's onnxruntime gives magika and open_nsfw with their weights as inputs."""
MAX_SECONDS = 600.0
"""A ceiling on the runs' wall time (from the first run's): it binds only where the count
misses most of a model's work or the machine is ten times slower than this one."""
SWEEP_SHARE = 0.6
MEASURE_ORDER = ("int4", "int2", "int3", "int6", "int8", "int5", "int7", "fp16", KEPT)
# The bound of a measured error (OutputProbe.errors): this quantile over this many
# resamples of the samples.
BOUND_QUANTILE = 0.9
BOOTSTRAP = 200
# A session whose weights are inputs must give the original's outputs this closely (relative
# L2) before its runs count as measurements.
EXACT_ENOUGH = 1e-4


class OutputProbe:
    """The original model's outputs on the search's inputs, and the error of other outputs
    against them; with a runner (`runner_probe`), runs with some weights replaced."""

    def __init__(self, feeds: Mapping[str, np.ndarray],
                 reference: Mapping[str, np.ndarray]) -> None:
        self.feeds = dict(feeds)
        self.reference = dict(reference)
        self.runner: Any = None
        self.run_macs = 0   # of one run (formats.onnx.work_estimate); 0 without a runner
        self.run_seconds = math.inf   # the first run's wall time
        self.signals: dict[str, np.ndarray] = {}   # the runner's values per-weight errors use

    def worst(self, outputs: Mapping[str, np.ndarray]) -> float:
        """The worst output's relative error (the evaluation's output error)."""
        return max(compare(ref, outputs[name]).rel_l2 for name, ref in self.reference.items())

    def errors(self, outputs: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """The worst output's relative error, and its bound: the BOUND_QUANTILE of the same
        over BOOTSTRAP resamples of the samples (the first axis every feed and output
        shares; without one, the error itself). A few samples that dominate the error
        make it uncertain, and a model that just meets a target on them may not on others
        of the same kind: measured on magika's 16 calibration strings, models at 0.098
        had 0.24 on 64 others, and a bound of 0.13."""
        point = self.worst(outputs)
        count = shared_samples((*self.feeds.values(), *self.reference.values()))
        if not count or count < 2:
            return point, point
        picks = np.random.default_rng(0).integers(0, count, (BOOTSTRAP, count))
        worst = np.zeros(BOOTSTRAP)
        for name, ref in self.reference.items():
            ref = ref.reshape(count, -1).astype(np.float64)
            diff = outputs[name].reshape(count, -1).astype(np.float64) - ref
            err = np.einsum("ij,ij->i", diff, diff)[picks].sum(axis=1)
            den = np.einsum("ij,ij->i", ref, ref)[picks].sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(den > 0, np.sqrt(err / den), np.where(err > 0, np.inf, 0.0))
            worst = np.maximum(worst, rel)
        return point, max(point, float(np.quantile(worst, BOUND_QUANTILE)))

    def replaced(self, weights: Mapping[str, np.ndarray]) -> float:
        """The squared relative error of each signal (the outputs, or the logits before a
        final softmax: formats.onnx.run.signals), summed, with `weights` (name -> decoded
        array) in place of the model's own."""
        outputs = self.runner.outputs(weights)
        total = 0.0
        for name, ref in self.signals.items():
            rel = compare(ref, outputs[name]).rel_l2
            total += rel * rel if math.isfinite(rel) else math.inf
        return total


def runner_probe(run: Any, path: Path, store: TensorStore, names: Sequence[str],
                 feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 workdir: Path) -> tuple[OutputProbe, list[str]]:
    """A probe that runs the model at `path` with the weights `names` as inputs, and notes;
    `run` is modelpress.formats.onnx.run. Without a usable session, a probe without
    runner (nothing is measured per tensor)."""
    probe = OutputProbe(feeds, reference)
    runner = run.VariantRunner(path, {name: store.read(name) for name in names}, dict(feeds),
                               workdir)
    start = time.perf_counter()
    outputs = runner.outputs()
    seconds = time.perf_counter() - start
    worst = probe.worst(outputs)
    if not worst <= EXACT_ENOUGH:
        return probe, [f"target: per-tensor output errors not measured (a session with the "
                       f"weights as inputs differs from the original by {worst:.2g}); "
                       "estimated from weight errors"]
    # Each chosen weight multiplies at least once per sample: a floor where the count
    # misses the model's work (products it does not count, subgraph bodies).
    floor = sum(store.tensors[n].size for n in names) * (shared_samples(feeds.values()) or 1)
    probe.runner, probe.run_seconds = runner, seconds
    probe.run_macs = max(run.run_macs(path, feeds), floor)
    probe.signals = {name: outputs[name] for name in dict.fromkeys(runner.signals.values())}
    return probe, []


@dataclass
class Table:
    """Every candidate of every chosen tensor: exact bytes, proxy error, and the output
    errors measured so far (by (tensor, candidate label))."""

    names: list[str]
    labels: list[str]
    nbytes: dict[tuple[str, str], int] = field(default_factory=dict)
    proxy: dict[tuple[str, str], float] = field(default_factory=dict)
    measured: dict[tuple[str, str], float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        """(tensor, candidate) pairs whose error is not exactly 0."""
        return sum(1 for value in self.proxy.values() if value > 0)

    def options(self) -> list[list[Option]]:
        """Each tensor's options (in `labels` order) with their estimated squared error."""
        ratios = _ratios(self.names, self.labels, self.proxy, self.measured)
        rows = []
        for name in self.names:
            row = []
            for label in self.labels:
                key = (name, label)
                err2 = self.measured.get(key)
                if err2 is None:
                    err2 = self.proxy[key] * ratios[key]
                row.append(Option(label, self.nbytes[key], err2))
            rows.append(row)
        return rows

    def unmeasured(self, chosen: Sequence[int]) -> list[tuple[str, str]]:
        """The pairs of an allocation whose error is estimated, not measured."""
        keys = [(name, self.labels[i]) for name, i in zip(self.names, chosen)]
        return [k for k in keys if k not in self.measured and self.proxy[k] > 0]


def measure_plan(names: Sequence[str], labels: Sequence[str], sizes: Mapping[str, int],
                 runs: int) -> list[tuple[str, str]]:
    """The (tensor, candidate) pairs to measure with `runs` model runs (see module doc)."""
    order = [label for label in MEASURE_ORDER if label in labels]
    order += [label for label in labels if label not in order]
    largest = sorted(names, key=lambda n: (-sizes[n], names.index(n)))
    return [(name, label) for label in order for name in largest][:max(runs, 0)]


class Sensitivity:
    """Encodes candidates through the pipeline and measures their output errors, within a
    budget of SENSITIVITY_MACS multiply-adds of runs (SWEEP_SHARE of it for the first sweep,
    the rest for the candidates allocations choose)."""

    def __init__(self, store: TensorStore, choices: Choices, names: Sequence[str],
                 options: Options, probe: OutputProbe | None,
                 macs: float = SENSITIVITY_MACS) -> None:
        self.store, self.choices, self.options, self.probe = store, choices, options, probe
        self.table = Table(list(names), [c.label for c in choices.candidates])
        runs = 0
        if probe is not None and probe.runner is not None:
            runs = min(int(macs // max(probe.run_macs, 1)),
                       int(MAX_SECONDS / max(probe.run_seconds, 1e-6)))
        self.runs_left = runs

    def sweep(self, progress: Progress | None = None) -> Table:
        """Encode every chosen tensor with every candidate; measure the planned pairs."""
        table, infos = self.table, {n: self.store.tensors[n] for n in self.table.names}
        planned = set(measure_plan(table.names, table.labels,
                                   {n: i.size for n, i in infos.items()},
                                   int(self.runs_left * SWEEP_SHARE)))
        for step, candidate in enumerate(self.choices.candidates):
            recipe = data_free(self.choices.recipe_for(candidate))
            for name, approx in self._encoded(recipe, table.names, candidate.label):
                if (name, candidate.label) in planned:
                    self._measure(name, candidate.label, approx)
                if progress:
                    progress(step, len(table.labels), f"target: {candidate.label} {name}")
            for name in table.names:  # left as it is by this candidate's stages
                table.nbytes.setdefault((name, candidate.label), infos[name].nbytes)
                table.proxy.setdefault((name, candidate.label), 0.0)
        return table

    def measure(self, pairs: Sequence[tuple[str, str]]) -> int:
        """Measure the output errors of `pairs` (within the runs left); how many were."""
        pairs = [p for p in pairs if p not in self.table.measured][:self.runs_left]
        for candidate in self.choices.candidates:
            names = [n for n, label in pairs if label == candidate.label]
            if not names:
                continue
            recipe = narrowed(self.store, data_free(self.choices.recipe_for(candidate)),
                              names, self.options)
            for name, approx in self._encoded(recipe, names, candidate.label):
                self._measure(name, candidate.label, approx)
        return len(pairs)

    def _encoded(self, recipe: Recipe, names: Sequence[str], label: str):
        """(name, decoded candidate) for each of `names` that `recipe` changes; records its
        bytes and proxy error."""
        if not recipe.stages:
            return
        wanted, table = set(names), self.table
        for name, encoded in encode_stream(self.store, recipe, self.options):
            if name not in wanted:
                continue
            approx = encoded.decode()
            table.nbytes[(name, label)] = encoded.nbytes
            table.proxy[(name, label)] = squared_error(self.store.read(name), approx,
                                                       self.store.tensors[name])
            yield name, approx

    def _measure(self, name: str, label: str, approx: np.ndarray) -> None:
        if self.runs_left <= 0 or (name, label) in self.table.measured:
            return
        self.table.measured[(name, label)] = self.probe.replaced({name: approx})
        self.runs_left -= 1


def narrowed(store: TensorStore, recipe: Recipe, names: Sequence[str],
             options: Options) -> Recipe:
    """`recipe` restricted to `names`: each stage names exactly the tensors among them it
    selects. A stage that looks at all its tensors first (global pruning) would decide
    differently on fewer, so such a recipe is kept whole."""
    if any(stage.needs_prepare for stage in recipe.stages):
        return recipe
    work = plan(store, recipe, options)
    stages = []
    for stage in recipe.stages:
        mine = [n for n in names if any(s is stage for s in work.get(n, []))]
        if mine:
            stages.append(dataclasses.replace(stage, include=tuple(escape_glob(n) for n in mine),
                                              exclude=(), take_all_named=True))
    return Recipe(stages)


def _ratios(names: Sequence[str], labels: Sequence[str], proxy: Mapping[tuple[str, str], float],
            measured: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Output error over proxy for every (tensor, candidate) (see the module doc): between
    two measured candidates of a tensor, interpolated in log; beyond them, the nearest
    one's ratio times how the ratio changes between those candidates on the tensors
    measured at both (the median); a tensor measured at none takes the median ratio of the
    others at that candidate, else of all, else 1."""
    known = {key: measured[key] / proxy[key] for key in measured if proxy.get(key, 0) > 0}
    fallback = float(np.median(list(known.values()))) if known else 1.0
    at = {label: [r for (_, lab), r in known.items() if lab == label] for label in labels}
    out = {}
    for name in names:
        points = [i for i, lab in enumerate(labels) if (name, lab) in known]
        for i, label in enumerate(labels):
            if (name, label) in known:
                out[(name, label)] = known[(name, label)]
            elif points and points[0] < i < points[-1]:
                ys = [math.log(max(known[(name, labels[j])], 1e-30)) for j in points]
                out[(name, label)] = math.exp(float(np.interp(i, points, ys)))
            elif points:
                j = min(points, key=lambda p: (abs(p - i), -p))
                out[(name, label)] = known[(name, labels[j])] * _shape(known, labels[j], label)
            else:
                out[(name, label)] = float(np.median(at[label])) if at[label] else fallback
    return out


def _shape(known: Mapping[tuple[str, str], float], base: str, label: str) -> float:
    """The median over tensors measured at both of ratio(label) / ratio(base), or 1."""
    factors = [known[(n, label)] / known[(n, b)] for (n, b) in known
               if b == base and (n, label) in known and known[(n, b)] > 0]
    return float(np.median(factors)) if factors else 1.0
