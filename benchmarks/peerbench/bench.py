"""Run every tool configuration on one model file and measure its output."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import analysis, coverage, evaluate
from .measure import ProcessRun, run_timed
from .models import ModelCase
from .report import THREADS, Row
from .tools import Config, cwd
from .weights import ModelWeights, first_line, read_weights, weight_consumers


@dataclass
class Settings:
    """Knobs of a run."""

    workdir: Path
    latency_budget: float = 2.0
    timeout: float = 3600.0
    repeat: int = 1  # timed runs per tool and model: the fastest is reported
    references: dict[int, str] | None = None  # bits -> label of the modelpress reference row


class OnnxOriginal:
    """What every ONNX output is compared with: the original's weights, outputs and sessions."""

    def __init__(self, case: ModelCase) -> None:
        import onnx

        self.path = case.onnx
        self.model = onnx.load(str(case.onnx))
        self.consumers = weight_consumers(self.model)
        weights = read_weights(self.model, self.consumers)
        self.weights = {k: r.values for k, r in weights.weights.items() if r.values is not None}
        self.feeds = case.inputs()
        self.tensor = evaluate.logits_name(self.model)
        self.reference = evaluate.run_tensor(self.model, self.tensor, self.feeds)
        self.latency_feeds = evaluate.head(self.feeds, case.latency_samples)
        self.sessions = {t: evaluate.original_session(self.path, t) for t in THREADS}
        self.elements = sum(int(w.size) for w in self.weights.values())
        self.op_elements: dict[str, int] = {}  # original consumer op -> weight elements
        for key, w in self.weights.items():
            op = self.consumers[key]
            self.op_elements[op] = self.op_elements.get(op, 0) + int(w.size)


def run_case(case: ModelCase, fmt: str, configs: list[Config], settings: Settings,
             log: Callable[[str], None]) -> tuple[list[Row], object | None]:
    """All configurations on the case's `fmt` file, then (ONNX) an equal-coverage modelpress row
    for each peer that changed fewer weights than the modelpress reference at its bits; returns
    the rows and the ONNX original."""
    src = case.onnx if fmt == "onnx" else case.safetensors
    original = OnnxOriginal(case) if fmt == "onnx" else None
    st_weights = analysis.safetensors_weights(src) if fmt == "safetensors" else None
    rows: list[Row] = []
    times: dict[str, float] = {}
    for cfg in configs:
        if fmt in cfg.formats:
            rows.append(_run_one(cfg, case, fmt, src, original, st_weights, settings, times, log))
    if original is not None:
        rows = _equal_coverage_rows(rows, configs, case, src, original, settings, times, log)
    for row in rows:
        ref = (settings.references or {}).get(row.config.bits)
        if row.status == "ok" and ref in times:
            row.time_ratio = row.run.seconds / times[ref]
    return rows, original


def _equal_coverage_rows(rows: list[Row], configs: list[Config], case: ModelCase, src: Path,
                         original: "OnnxOriginal", settings: Settings, times: dict[str, float],
                         log: Callable[[str], None]) -> list[Row]:
    """The rows with equal-coverage modelpress rows (coverage.py) run and placed after the last
    modelpress row."""
    extra: list[Row] = []
    for label in (settings.references or {}).values():
        reference = next((c for c in configs if c.label == label), None)
        if reference is None:
            continue
        for cfg in coverage.equal_coverage_configs(rows, reference, original.model):
            row = _run_one(cfg, case, "onnx", src, original, None, settings, times, log)
            note = coverage.coverage_note(row, reference)
            # a failed row's first note is why (the table shows only that one)
            row.notes.insert(0 if row.status == "ok" else len(row.notes), note)
            extra.append(row)
    last = max((i for i, r in enumerate(rows) if r.config.driver == "modelpress"), default=-1)
    return rows[:last + 1] + extra + rows[last + 1:]


def _run_one(cfg: Config, case: ModelCase, fmt: str, src: Path, original: "OnnxOriginal | None",
             st_weights: dict[str, np.ndarray] | None, settings: Settings,
             times: dict[str, float], log: Callable[[str], None]) -> Row:
    """One configuration on one file: run it, read its output back, measure (a row, whatever
    happens)."""
    row = Row(cfg)
    missing = cfg.missing()
    if missing:
        row.status, row.notes = "skipped", [missing]
        log(f"  {cfg.label}: skipped ({missing})")
        return row
    out_dir = settings.workdir / "out" / case.name / fmt / _slug(cfg.label)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    dst = out_dir / (case.name + cfg.suffix(fmt))
    calibration = None
    if cfg.calibrated and case.calibration is not None and fmt == "onnx":
        calibration = settings.workdir / "calibration" / f"{case.name}.npz"
        if not calibration.exists():
            calibration.parent.mkdir(parents=True, exist_ok=True)
            np.savez(calibration, **case.calibration())
    elif cfg.calibrated:
        row.notes.append("run without --calibration: " + (
            "no calibration inputs for this model" if fmt == "onnx" else
            "safetensors holds no graph to run"))
    row.run = _timed_runs(cfg.command(src, dst, calibration), settings)
    if not row.run.ok or not dst.exists():
        row.status = "failed"
        row.notes = [row.run.error or "no output written"]
        log(f"  {cfg.label}: failed ({row.notes[0]})")
        shutil.rmtree(out_dir, ignore_errors=True)
        return row
    times[cfg.label] = row.run.seconds
    row.size = analysis.folder_bytes(out_dir)
    row.size_ratio = row.size / src.stat().st_size
    try:
        if fmt == "onnx":
            _analyse_onnx(row, dst, original, settings)
        else:
            _analyse_safetensors(row, dst, st_weights)
    except Exception as exc:  # noqa: BLE001 - a broken output is a table row, not a crash
        row.notes.append(f"analysis failed: {first_line(exc)}")
    shutil.rmtree(out_dir, ignore_errors=True)
    log(f"  {cfg.label}: {row.run.seconds:.2f} s")
    return row


def _timed_runs(cmd: list[str], settings: Settings) -> ProcessRun:
    """Run the command `settings.repeat` times (stopping at a failure): the shortest wall time
    and the largest peak RSS."""
    runs = []
    for _ in range(max(1, settings.repeat)):
        runs.append(run_timed(cmd, cwd(), timeout=settings.timeout))
        if not runs[-1].ok:
            return runs[-1]
    peaks = [r.peak_rss for r in runs if r.peak_rss is not None]
    return ProcessRun(min(r.seconds for r in runs), max(peaks) if peaks else None, 0)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def _analyse_onnx(row: Row, dst: Path, original: OnnxOriginal, settings: Settings) -> None:
    import onnx

    if row.config.driver == "gguf":
        model, weights = _gguf_as_onnx(dst, original)
        row.notes.append("GGUF: not run in onnxruntime (output error: dequantized weights in the "
                         "ONNX graph)")
    else:
        model = onnx.load(str(dst))
        weights = read_weights(model, original.consumers)
    values = {k: r.values for k, r in weights.weights.items()}
    problems = {k: r.problem for k, r in weights.weights.items() if r.problem}
    row.stats = analysis.compare(original.weights, values, weights.storage_bytes, problems)
    if row.stats.problems:
        row.notes.append(f"{len(row.stats.problems)} weights unreadable ({row.stats.problems[0]})")
    try:
        row.error = evaluate.output_error(original.reference, model, original.tensor, original.feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime refusing a peer's model is a result
        row.notes.append(f"does not run in onnxruntime: {first_line(exc)}")
        return
    if row.error.tensor != original.tensor:
        row.notes.append(f"output error measured at `{row.error.tensor}` (the tool removed "
                         f"`{original.tensor}`; same place before the softmax)")
    if row.config.driver == "gguf":
        return
    for threads in THREADS:
        try:
            row.latency[threads] = evaluate.latency(
                original.path, dst, original.latency_feeds, threads, settings.latency_budget,
                original_session=original.sessions[threads])
        except Exception as exc:  # noqa: BLE001
            row.notes.append(f"latency ({threads or 'default'} threads): {first_line(exc)}")
    if _qdq_conv(model, original):
        try:  # int8 Conv weights as DequantizeLinear: also the session option that folds them
            row.latency_noqdq = evaluate.latency(
                original.path, dst, original.latency_feeds, 0, settings.latency_budget,
                original_session=original.sessions[0], config=evaluate.NO_QDQ)
        except Exception as exc:  # noqa: BLE001
            row.notes.append(f"latency (disable_quant_qdq): {first_line(exc)}")


def _qdq_conv(model, original: OnnxOriginal) -> bool:
    """True when the session option session.disable_quant_qdq can matter: the original has Conv
    weights and the compressed model has DequantizeLinear nodes."""
    return original.op_elements.get("Conv", 0) > 0 and any(
        n.op_type == "DequantizeLinear" for n in model.graph.node)


def _gguf_as_onnx(path: Path, original: OnnxOriginal):
    """The original ONNX model with the GGUF file's dequantized weights in place of its
    initializers, and its weights with the GGUF bytes as their storage."""
    import onnx
    from onnx import numpy_helper

    from .gguf_io import read_gguf

    read = read_gguf(path)
    model = onnx.ModelProto()
    model.CopyFrom(original.model)
    for i, t in enumerate(model.graph.initializer):
        if t.name in read and read[t.name][2]:
            dtype = numpy_helper.to_array(t).dtype
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(read[t.name][0].astype(dtype), t.name))
    weights: ModelWeights = read_weights(model, original.consumers)
    for name, (_, nbytes, quantized) in read.items():
        if quantized and name in weights.tensor_bytes:
            weights.tensor_bytes[name] = nbytes
    return model, weights


def _analyse_safetensors(row: Row, dst: Path, original: dict[str, np.ndarray]) -> None:
    if row.config.driver == "gguf":
        from .gguf_io import read_gguf

        read = read_gguf(dst)
        values = {k: v[0] for k, v in read.items()}
        stored = {k: v[1] for k, v in read.items()}
    else:
        values, stored = analysis.modelpress_safetensors(dst)
    row.stats = analysis.compare(original, values, lambda keys: sum(stored[k] for k in keys))
    if row.stats.problems:
        row.notes.append(f"{len(row.stats.problems)} weights unreadable ({row.stats.problems[0]})")


def log_stderr(message: str) -> None:
    """Progress lines go to stderr so that stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)
