"""One trial of a budgeted run: allocate, write the model it makes, and measure it.

`Trial` holds what the search knows (modelpress.app.sensitivity's table of
candidates), allocates with it (measuring first the errors an allocation
relies on that are not measured yet, while the run budget lasts), writes an
allocation's model to the scratch folder through the same pipeline and writer
as the final run, and measures its size on disk and its output error. What a
file holds besides the chosen tensors' bytes is fitted to the models measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from modelpress.core.budget import Allocation, Option, totals
from modelpress.core.candidates import data_free, underdetermined
from modelpress.core.pipeline import encode_stream
from modelpress.core.quantize.plan import has_second_moments
from modelpress.core.recipe import Recipe
from modelpress.core.store import TensorStore, WriteOptions
from modelpress.formats.safetensors.ct_config import loader_form

from modelpress.app.api import compress
from modelpress.app.evaluation import onnx_runner
from modelpress.app.sensitivity import OutputProbe, Sensitivity, narrowed

# What an output holds besides the chosen tensors' bytes, first guess: a base (graph nodes,
# metadata: bytes, plus bytes per chosen tensor), and in ONNX about 3 kB per quantized layout
# used, the function that decodes it (measured on the sample transformer: 8.3 kB besides
# the tensors with int4 alone, 11.4 kB with int4 and int5, 14.3 kB with int4 to int6).
# Measured models replace the guess: base and per-layout bytes are fitted to them.
BASE_GUESS = {"onnx": (4096, 512), "safetensors": (0, 256)}
FORM_GUESS = {"onnx": 3000}
CACHE_SHARE = 1.0


@dataclass
class Measured:
    """One model tried: its file size, and its worst output error on the search's inputs with
    that error's bound over resamples of those inputs (`OutputProbe.errors`)."""

    file_bytes: int
    error: float | None = None
    bound: float | None = None


class Trial:
    """Allocates (measuring the errors an allocation relies on first, while runs are left),
    writes an allocation's model to the scratch folder and measures it."""

    def __init__(self, measure: Sensitivity, writer: WriteOptions | None, path: Path,
                 for_loaders: bool = False, calibration: Path | None = None) -> None:
        self.measure, self.table, self.store = measure, measure.table, measure.store
        self.writer, self.path, self.for_loaders = writer, path, for_loaders
        self.calibration = calibration   # the .npz the run rounds with (ONNX), or None
        self.options = self.table.options()
        self.tried: dict[tuple[int, ...], Measured] = {}
        fixed, per_tensor = BASE_GUESS.get(self.store.format, (0, 0))
        self.rest = self.store.file_bytes - sum(self.store.tensors[n].nbytes
                                                for n in self.table.names)
        self.base = self.rest + fixed + per_tensor * len(self.table.names)
        self.form_bytes = FORM_GUESS.get(self.store.format, 0)
        self.forms = {c.label for c in measure.choices.candidates
                      if c.stage is not None and c.stage.id == "quantize"}
        self.seen: list[tuple[int, int]] = []   # (layouts used, bytes besides the tensors)
        # (tensor, label, free) -> its encoding in the models tried, while they hold at most
        # CACHE_SHARE of the chosen tensors' bytes: a model tried after another encodes only
        # the tensors whose candidate changed (gptq rounding takes most of a trial's time).
        self.encoded: dict[tuple[str, str, bool], Any] = {}
        # Trials round without the calibration data (`data_free`) when `free`; `final` then
        # measures the model the run writes. See modelpress.app.budget.settle.
        self.free = False
        self.finals: dict[tuple[int, ...], Measured] = {}
        self.calibrated = any(has_second_moments(self.store.tensors[n])
                              for n in self.table.names)
        self.cache_room = CACHE_SHARE * sum(self.store.tensors[n].nbytes
                                            for n in self.table.names)

    def costs(self) -> dict[str, int]:
        """The bytes each candidate label costs once, when an allocation uses it."""
        return {label: self.form_bytes for label in self.forms}

    def _learn(self, chosen: Allocation, file_bytes: int) -> None:
        """Fit the base and per-layout bytes to what the measured files hold."""
        forms = len({self.table.labels[i] for i in chosen} & self.forms)
        self.seen.append((forms, file_bytes - totals(self.options, chosen)[0]))
        if len({f for f, _ in self.seen}) > 1:
            xs, ys = zip(*self.seen)
            self.form_bytes = max(0, int(round(float(np.polyfit(xs, ys, 1)[0]))))
        self.base = max(other - self.form_bytes * f for f, other in self.seen)

    def allocate(self, rule: Callable[[list[list[Option]]], Allocation | None]
                 ) -> Allocation | None:
        """`rule`'s allocation, after the errors it relies on were measured (if runs remain)."""
        while True:
            chosen = rule(self.options)
            if chosen is None or not self.measure.measure(self.table.unmeasured(chosen)):
                return chosen
            self.options = self.table.options()

    def labels(self, chosen: Allocation) -> dict[str, str]:
        """Each chosen tensor's candidate label."""
        return {name: self.table.labels[i] for name, i in zip(self.table.names, chosen)}

    @property
    def in_order(self) -> bool:
        """Whether the run writes its layers rounded in order (--sequential): with a size
        target only (`free` trials), whose pick is then measured as written (`final`); an
        error target's file is the trial that met it."""
        return (self.free and self.calibration is not None
                and bool(getattr(self.measure.choices.chooser, "sequential", False)))

    def recipe(self, chosen: Allocation) -> Recipe:
        return self.measure.choices.final_recipe(self.labels(chosen), list(self.store.tensors),
                                                 self.in_order)

    def __call__(self, chosen: Allocation) -> Measured:
        key = tuple(chosen)
        if key not in self.tried:
            self.tried[key] = self._write(chosen, self.free)
            self._learn(chosen, self.tried[key].file_bytes)
        return self.tried[key]

    def final(self, chosen: Allocation) -> Measured:
        """The model the run writes for `chosen` (calibrated rounding), measured: the trial
        itself where trials round as the run does."""
        if not self.free:
            return self(chosen)
        key = tuple(chosen)
        if key not in self.finals:
            self.finals[key] = (self._written(chosen) if self._rounds_in_order(chosen)
                                else self._write(chosen, False))
        return self.finals[key]

    def _rounds_in_order(self, chosen: Allocation) -> bool:
        """Whether the run rounds some of `chosen`'s quantized layers in order: `in_order`,
        and a MatMul/Gemm weight among them with the calibration rows it takes
        (modelpress.formats.onnx.sequential; Conv layers keep the original inputs there)."""
        if not self.in_order:
            return False
        # onnx (which it imports) is loaded by now: only ONNX models are calibrated
        from modelpress.formats.onnx.sequential import eligible
        for name, label in self.labels(chosen).items():
            info = self.store.tensors[name]
            stats = info.input_stats
            if (label in self.forms and info.role in ("MatMul", "Gemm") and stats is not None
                    and eligible(stats.mean.shape[-1], stats.samples)):
                return True
        return False

    def _written(self, chosen: Allocation) -> Measured:
        """The model written by the run itself (`api.compress`: calibrated afresh, layers
        rounded in order), measured. On the sample transformer at the default int4 file's
        size: 0.0394 where the trials' rounding, each layer on the original inputs, gave
        0.0456 (evaluation rows). Where no layer is rounded in order `final` does not call
        it: it rounds every tensor by gptq, those `underdetermined` too (open_nsfw: +25 s)."""
        writer = {} if self.writer is None else {"onnx_options": self.writer}
        report = compress(self.store.path, self.path, self.recipe(chosen), self.measure.options,
                          calibration=self.calibration, **writer)
        return self._measured(report.file_bytes_after, self.measure.probe)

    def refit(self, chosen: Allocation, store: TensorStore, probe: OutputProbe,
              cache: dict[tuple[str, str], Any]) -> Measured:
        """The model the run writes for `chosen`, rounded with the statistics of `store` (the
        model calibrated on part of the rows, every tensor as the run rounds it), measured by
        `probe` (on the other rows). `cache`: (tensor, label) -> encoding, shared by the
        models refitted on the same `store`."""
        return self._write_stream(self._fitted(chosen, store, cache), probe)

    def _write(self, chosen: Allocation, free: bool) -> Measured:
        return self._write_stream(self._stream(chosen, free), self.measure.probe)

    def _write_stream(self, stream: Iterator[tuple[str, Any]],
                      probe: OutputProbe | None) -> Measured:
        stored = ((name, loader_form(e)) for name, e in stream) if self.for_loaders \
            else stream
        try:
            result = self.store.write(self.path, stored, options=self.writer)
        finally:
            getattr(stream, "close", lambda: None)()
        return self._measured(result.file_bytes, probe)

    def _measured(self, file_bytes: int, probe: OutputProbe | None) -> Measured:
        """The model at `path` (of `file_bytes`), its output error measured by `probe`."""
        measured = Measured(file_bytes)
        if probe is not None:
            outputs = onnx_runner().Session(self.path).run(probe.feeds)
            measured.error, measured.bound = probe.errors(outputs)
        return measured

    def _fitted(self, chosen: Allocation, store: TensorStore,
                cache: dict[tuple[str, str], Any]) -> Iterator[tuple[str, Any]]:
        """The allocation's tensors encoded as the run encodes them, from `store`."""
        if len(self.measure.choices.recipe.stages) > 1:
            return encode_stream(store, self.recipe(chosen), self.measure.options)
        labels = self.labels(chosen)
        wanted = {n: label for n, label in labels.items() if (n, label) not in cache}
        for name, label, encoded in self._by_candidate(store, wanted, lambda n: _as_run):
            cache[(name, label)] = encoded
        return iter([(name, cache[(name, labels[name])]) for name in store.tensors
                     if (name, labels.get(name)) in cache])

    def _stream(self, chosen: Allocation, free: bool) -> Iterator[tuple[str, Any]]:
        """The allocation's encoded tensors in store order (`free`: rounded without the
        calibration data; else as the run rounds them, but for tensors gptq would fit on
        fewer rows than their inputs: `underdetermined`), from the cache where it has
        them. Where the recipe has stages besides the chosen one, all are encoded afresh."""
        if len(self.measure.choices.recipe.stages) > 1:
            return encode_stream(self.store, (data_free if free else _as_run)(
                self.recipe(chosen)), self.measure.options)
        labels = self.labels(chosen)
        wanted = {n: label for n, label in labels.items() if (n, label, free) not in self.encoded}

        def rounding(name: str) -> Callable[[Recipe], Recipe]:
            return data_free if free or underdetermined(self.store.tensors[name]) else _as_run
        fresh = {(name, label, free): encoded for name, label, encoded
                 in self._by_candidate(self.store, wanted, rounding)}
        known = {**fresh, **self.encoded}
        pairs = [(name, known.get((name, labels[name], free))) for name in self.store.tensors
                 if name in labels]
        for key, encoded in fresh.items():
            if encoded.nbytes <= self.cache_room:
                self.encoded[key] = encoded
                self.cache_room -= encoded.nbytes
        return iter([(name, encoded) for name, encoded in pairs if encoded is not None])

    def _by_candidate(self, store: TensorStore, wanted: dict[str, str],
                      rounding: Callable[[str], Callable[[Recipe], Recipe]]
                      ) -> Iterator[tuple[str, str, Any]]:
        """(name, label, encoding) of each tensor in `wanted` (name -> candidate label),
        encoded from `store` by one pipeline run per candidate and rounding (`rounding`
        gives a tensor's: `data_free` or `_as_run`)."""
        choices, options = self.measure.choices, self.measure.options
        for candidate in choices.candidates:
            if candidate.stage is None:  # kept as it is: nothing to encode
                continue
            parts: dict[Callable[[Recipe], Recipe], list[str]] = {}
            for name, label in wanted.items():
                if label == candidate.label:
                    parts.setdefault(rounding(name), []).append(name)
            for rounded, names in parts.items():
                recipe = narrowed(store, rounded(choices.recipe_for(candidate)), names, options)
                for name, encoded in encode_stream(store, recipe, options):
                    yield name, candidate.label, encoded

    def estimate(self, chosen: Allocation) -> int:
        """The file size an allocation is expected to have (before it is measured)."""
        forms = len({self.table.labels[i] for i in chosen} & self.forms)
        return totals(self.options, chosen)[0] + self.base + self.form_bytes * forms

    def uniform(self) -> list[Allocation]:
        """Every tensor at the same candidate, for each candidate, smallest first."""
        count = len(self.table.labels)
        found = [[i] * len(self.options) for i in range(count)]
        return sorted(found, key=lambda c: totals(self.options, c)[0])


def _as_run(recipe: Recipe) -> Recipe:
    """A recipe rounded as the run rounds it (with the calibration data where it has them)."""
    return recipe
