"""Compare techniques side by side: apply several recipes to one model, measure each.

Each setting is encoded in memory and written to a temporary file (its real
size on disk, and for ONNX a model to run); nothing is left behind.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from modelpress.core.errors import ModelpressError, RecipeError
from modelpress.core.evaluate import Evaluation
from modelpress.core.metrics import EMPTY, ErrorStats
from modelpress.app.evaluation import Baseline, EvalSettings
from modelpress.core.pipeline import Options, encode
from modelpress.core.recipe import RECIPE_VERSION, Recipe, read_document
from modelpress.core.registry import REGISTRY, stage_from_config
from modelpress.core.store import Progress
from modelpress.formats import open_model

BITS_DEFINITION = ("bits/weight: bytes written for the changed tensors (codes, scales, zero "
                   "points, masks, factors) x 8 / their number of elements")
FRONT_DEFINITION = ("front: no other setting is at most as large and at most as wrong, "
                    "and better in one")


@dataclass(frozen=True)
class Setting:
    """A named recipe to try, as stage configs ({id, ...options})."""

    name: str
    stages: tuple[dict[str, Any], ...]

    def recipe(self) -> Recipe:
        """The recipe; RecipeError when a stage or option is not available."""
        return Recipe.from_config({"version": RECIPE_VERSION, "stages": list(self.stages)},
                                  source=self.name)

    def unavailable(self) -> str | None:
        """Why this setting cannot run with the stages this build has, or None."""
        for stage in self.stages:
            if stage.get("id") not in REGISTRY:
                return f"stage {stage.get('id')!r} not available"
            try:
                stage_from_config(stage)
            except RecipeError as exc:
                return str(exc)
        try:
            self.recipe()
        except RecipeError as exc:
            return str(exc)
        return None


def _s(name: str, *stages: dict[str, Any]) -> Setting:
    return Setting(name, tuple(stages))


DEFAULT_SETTINGS: tuple[Setting, ...] = (
    _s("int8 channel", {"id": "quantize", "bits": 8, "granularity": "channel"}),
    _s("int4 g128", {"id": "quantize", "bits": 4, "group_size": 128, "method": "rtn"}),
    _s("int4 g32 mse", {"id": "quantize", "bits": 4, "group_size": 32, "method": "mse"}),
    _s("fp16", {"id": "cast", "dtype": "fp16"}),
    _s("fp8 e4m3", {"id": "cast", "dtype": "fp8-e4m3"}),
    _s("prune 50%", {"id": "prune", "sparsity": 0.5}),
    _s("prune 2:4 + int4", {"id": "prune", "pattern": "2:4"}, {"id": "quantize", "bits": 4}),
    _s("lowrank 0.5", {"id": "lowrank", "rank_ratio": 0.5}),
    _s("lowrank 0.25", {"id": "lowrank", "rank_ratio": 0.25}),
    _s("cluster 4-bit", {"id": "cluster", "bits": 4}),
    _s("cluster 6-bit", {"id": "cluster", "bits": 6}),
)
"""The techniques `modelpress sweep` tries by default, in table order."""


@dataclass
class SweepRow:
    """One setting's outcome: 'ok', 'skipped' (not available) or 'failed' (with a note)."""

    name: str
    stages: tuple[dict[str, Any], ...]
    status: str
    note: str = ""
    file_bytes: int = 0
    file_bytes_before: int = 0
    tensor_bytes: int = 0
    elements: int = 0
    tensors: int = 0
    weight_error: ErrorStats = EMPTY
    evaluation: Evaluation | None = None
    on_front: bool = False

    @property
    def ratio(self) -> float:
        """Output file size over input file size."""
        return self.file_bytes / self.file_bytes_before if self.file_bytes_before else 1.0

    @property
    def bits_per_weight(self) -> float | None:
        """Bytes written for the changed tensors x 8 / their element count."""
        return 8 * self.tensor_bytes / self.elements if self.elements else None

    @property
    def output_error(self) -> float | None:
        """The worst output's relative L2 error, when the model was run."""
        return self.evaluation.output_error if self.evaluation is not None else None

    @property
    def latency_ratio(self) -> float | None:
        latency = self.evaluation.latency if self.evaluation is not None else None
        return None if latency is None else latency.ratio

    @property
    def top1_agreement(self) -> float | None:
        """The lowest top-1 agreement over class-score outputs."""
        if self.evaluation is None:
            return None
        values = [o.top1_agreement for o in self.evaluation.outputs
                  if o.top1_agreement is not None]
        return min(values) if values else None

    @property
    def accuracy(self) -> float | None:
        accuracy = self.evaluation.accuracy if self.evaluation is not None else None
        return None if accuracy is None else accuracy.after

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "recipe": {"version": RECIPE_VERSION,
                                              "stages": [dict(s) for s in self.stages]},
                "status": self.status, "note": self.note, "file_bytes": self.file_bytes,
                "ratio": self.ratio if self.status == "ok" else None,
                "bits_per_weight": self.bits_per_weight, "tensors_changed": self.tensors,
                "weight_error": _finite(self.weight_error.rel_l2) if self.status == "ok" else None,
                "output_error": _finite(self.output_error),
                "top1_agreement": self.top1_agreement, "accuracy": self.accuracy,
                "latency_ratio": _finite(self.latency_ratio), "on_front": self.on_front,
                "evaluation": None if self.evaluation is None else self.evaluation.as_dict()}


@dataclass
class SweepReport:
    """Every setting tried on one model, with the size/error Pareto front marked."""

    model: str
    format: str
    file_bytes: int
    rows: list[SweepRow] = field(default_factory=list)
    front_metric: str = "weight error"
    baseline: Evaluation | None = None
    accuracy_before: float | None = None
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    input_sha256: str | None = None

    @property
    def ran(self) -> list[SweepRow]:
        return [r for r in self.rows if r.status == "ok"]

    def as_dict(self) -> dict[str, Any]:
        """Every number of the sweep table, JSON-safe."""
        return {"tool": {"name": "modelpress", "command": "sweep"}, "model": self.model,
                "format": self.format, "file_bytes": self.file_bytes,
                "front_metric": self.front_metric, "accuracy_before": self.accuracy_before,
                "definitions": {"bits_per_weight": BITS_DEFINITION, "front": FRONT_DEFINITION},
                "evaluation": None if self.baseline is None else self.baseline.as_dict(),
                "settings": [r.as_dict() for r in self.rows], "notes": list(self.notes),
                "versions": dict(self.versions), "input_sha256": self.input_sha256}


def load_settings(path: str | os.PathLike) -> list[Setting]:
    """Named recipes from YAML/JSON: a list of {name, stages}, or {version, recipes: [...]}."""
    data = read_document(path)
    if isinstance(data, dict):
        unknown = set(data) - {"version", "recipes"}
        if unknown or not isinstance(data.get("recipes"), list):
            raise RecipeError(f"{path}: expected a list of recipes, or a mapping with 'recipes' "
                              "(and 'version'), each recipe {name: ..., stages: [...]}")
        data = data["recipes"]
    if not isinstance(data, list) or not data:
        raise RecipeError(f"{path}: expected a non-empty list of recipes, each "
                          "{name: ..., stages: [{id: ..., options}]}")
    settings, names = [], set()
    for i, entry in enumerate(data, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not entry["name"].strip():
            raise RecipeError(f"{path}: recipe {i} needs a 'name' (text) and 'stages'")
        name = entry["name"]
        if name in names:
            raise RecipeError(f"{path}: recipe name {name!r} is used twice; names must differ")
        names.add(name)
        config = {k: v for k, v in entry.items() if k != "name"}
        recipe = Recipe.from_config(config, source=f"{path}: recipe {name!r}")
        settings.append(Setting(name, tuple(s.get_config() for s in recipe.stages)))
    return settings


def sweep(src: str | os.PathLike, settings: Sequence[Setting] = DEFAULT_SETTINGS,
          options: Options = Options(), evaluation: EvalSettings | None = EvalSettings(),
          progress: Progress | None = None) -> SweepReport:
    """Apply each setting to the model at `src` and measure size, error and latency."""
    src = Path(src)
    store = open_model(src)
    if store.encodings:
        raise ModelpressError(f"{src}: already compressed by modelpress; run "
                              "`modelpress decompress` on it first")
    baseline = Baseline.prepare(src, evaluation) if evaluation is not None else None
    report = SweepReport(str(store.path), store.format, store.file_bytes)  # a folder's index
    if baseline is not None:
        report.baseline, report.accuracy_before = baseline.describe(), baseline.accuracy
        report.notes += baseline.notes
    with tempfile.TemporaryDirectory(prefix="modelpress-sweep-") as tmp:
        for i, setting in enumerate(settings):
            if progress:
                progress(i, len(settings), setting.name)
            suffix = ".safetensors.index.json" if store.sharded else src.suffix
            path = Path(tmp) / f"setting-{i}{suffix}"
            report.rows.append(_run_one(store, setting, options, baseline, path))
            path.unlink(missing_ok=True)
    if progress:
        progress(len(settings), len(settings), "")
    report.front_metric = mark_front(report.ran)
    return report


def _run_one(store: Any, setting: Setting, options: Options, baseline: Baseline | None,
             path: Path) -> SweepRow:
    row = SweepRow(setting.name, setting.stages, "skipped", file_bytes_before=store.file_bytes)
    why = setting.unavailable()
    if why is not None:
        row.note = f"skipped: {why}"
        return row
    try:
        encoding = encode(store, setting.recipe(), options)
        written = store.write(path, encoding.tensors)
    except ModelpressError as exc:
        row.status, row.note = "failed", f"failed: {exc}"
        return row
    row.status, row.file_bytes = "ok", written.file_bytes
    row.tensor_bytes = sum(written.tensor_bytes.values())
    row.elements = sum(store.tensors[name].size for name in encoding.tensors)
    row.tensors = len(encoding.tensors)
    row.weight_error = sum(encoding.errors.values(), EMPTY)
    if not encoding.tensors:
        row.note = "changed no tensor" + (f" ({encoding.notes[0]})" if encoding.notes else "")
    if baseline is not None:
        row.evaluation = baseline.evaluate(path)
        if row.evaluation.status not in ("ok", "not-applicable") and row.evaluation.notes:
            row.note = row.evaluation.notes[0]
    return row


def mark_front(rows: Iterable[SweepRow]) -> str:
    """Mark the size/error Pareto front; return which error it uses.

    Only settings that changed some tensor take part. The error is output
    error when every such row has one (ONNX, evaluated), else weight error.
    """
    # A setting that changed nothing is the original model: it is no trade-off.
    rows = [r for r in rows if r.tensors]
    use_output = bool(rows) and all(r.output_error is not None for r in rows)
    metric = "output error" if use_output else "weight error"
    points = [(r.file_bytes, _nan_last(r.output_error if use_output else r.weight_error.rel_l2))
              for r in rows]
    for row, flags, (_, error) in zip(rows, pareto_front(points), points):
        row.on_front = flags and math.isfinite(error)  # an unmeasured error is no trade-off
    return metric


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (size, error), whether no other point is <= in both and < in one."""
    front = []
    for i, (size, error) in enumerate(points):
        dominated = any(s <= size and e <= error and (s < size or e < error)
                        for j, (s, e) in enumerate(points) if j != i)
        front.append(not dominated)
    return front


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
