"""Compress a tree of models with one recipe: plan, run in parallel processes, report.

`plan_batch` finds the models under the inputs (see `modelpress.formats.discover`),
keeps this run's slice (`--shard K/N`) and maps each to its place under the
output folder. `run_batch` compresses the models, one process per job, copies
the other files, and returns a `BatchReport`; a model that fails is reported
and the others go on. `dry_run` says what would be done, with estimated sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from modelpress.app.batch.report import FAILED, OK, SKIPPED, BatchReport, ModelResult, Refusal
from modelpress.app.batch.runner import run_copies_and_models
from modelpress.app.batch.worker import CANCELLED, JobSpec, Task
from modelpress.core.errors import ModelpressError, ModelReadError, ModelWriteError
from modelpress.core.estimate import estimate
from modelpress.core.pipeline import RUN_ONLY_OPTIONS, Options, default_threads
from modelpress.core.recipe import Recipe
from modelpress.formats import open_model
from modelpress.formats.discover import discover
from modelpress.formats.location import AnyPath, ObjectPath, file_size, is_dir, location
from modelpress.formats.onnx.options import OnnxWriteOptions
from modelpress.formats.outputs import (check_inside, input_key, output_bytes, same_file_content,
                                        up_to_date)
from modelpress.formats.safetensors.options import SafetensorsWriteOptions

OnEvent = Callable[[tuple[Any, ...]], None]
"""on_event(event): ("plan", models, copies), ("taken", path, pid), ("start", path, bytes),
("progress", path, done, total, what), ("done", path, status), ("model", ModelResult),
("copy", CopyResult)."""

# Memory one job needs, estimated from the model's bytes on disk (see README):
# measured peaks were 0.22 GB for a 0.1 GB safetensors model and 0.97 GB for a
# 0.1 GB ONNX model at 4 bits (the whole graph is copied, converted and checked).
_BASE_NEED = 256 * 2**20
_NEED_FACTOR = {"onnx": 10, "safetensors": 2, "sharded": 2}


class Executor(Protocol):
    """Runs a whole batch elsewhere than this machine's process pool (see `BatchOptions`)."""

    def run_batch(self, plan: BatchPlan, recipe: Recipe, options: Options,
                  batch: BatchOptions, on_event: OnEvent | None = None, *,
                  onnx_options: OnnxWriteOptions = OnnxWriteOptions(),
                  safetensors_options: SafetensorsWriteOptions = SafetensorsWriteOptions()
                  ) -> BatchReport:
        """The same report as the local pool's `run_batch` for the same plan."""


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs: parallel jobs, resumption, failure policy."""

    jobs: int | None = None          # None: CPU count bounded by memory
    skip_existing: bool = False
    fail_fast: bool = False
    # With several jobs, worker processes start only if the batch is still
    # running after this many seconds. A worker costs about 0.3-0.4 s of CPU
    # to start (a Python interpreter importing numpy and onnx), more than a
    # batch of sample-size models takes in one process; waiting about as long
    # as a start costs bounds the loss on short batches and delays long ones
    # by as little.
    start_delay: float = 0.4
    # With several jobs, this process compresses models too (it is already
    # warm); False leaves all models to worker processes.
    run_here: bool = True
    # Where the models run: None for this machine's process pool, or another executor
    # such as `modelpress.app.batch.cluster.DaskExecutor` (a Dask cluster).
    executor: Executor | None = None


@dataclass
class CopyTask:
    """A file copied unchanged."""

    rel: str
    src: AnyPath
    dst: AnyPath
    outdir: AnyPath


@dataclass
class BatchPlan:
    """This run's models and copies, with their output paths."""

    base: AnyPath
    outdir: AnyPath
    tasks: list[Task] = field(default_factory=list)
    copies: list[CopyTask] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    blocked: list[ModelResult] = field(default_factory=list)  # models refused before running
    shard: str | None = None
    models_in_tree: int = 0


def parse_shard(text: str) -> tuple[int, int]:
    """(K, N) from 'K/N' with 1 <= K <= N; ValueError otherwise."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r} is not K/N (e.g. 2/4)") from None
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"{text!r}: K must be between 1 and N (e.g. 1/4 ... 4/4)")
    return k, n


def shard_slice(items: list[Any], shard: tuple[int, int] | None) -> list[Any]:
    """The K-th of N round-robin slices of a list already sorted by relative path."""
    if shard is None:
        return list(items)
    k, n = shard
    return items[k - 1::n]


def _real(path: AnyPath) -> str:
    """What names one file: its resolved path, or an object's URL."""
    return path.url if isinstance(path, ObjectPath) else os.path.realpath(path)


def plan_batch(inputs: list[str | os.PathLike | AnyPath], outdir: str | os.PathLike | AnyPath,
               shard: tuple[int, int] | None = None) -> BatchPlan:
    """Find the models under `inputs` and map this shard's share of them into `outdir`.

    Inputs and output may be URLs of object storage (a prefix is a folder)."""
    outdir = location(outdir)
    if isinstance(outdir, Path):
        outdir = Path(os.path.abspath(outdir))
    inputs = [location(given) for given in inputs]
    for given in inputs:
        if _real(given) == _real(outdir) and is_dir(given):
            raise ModelWriteError(f"{outdir}: the output folder is the input folder; choose "
                                  "another (modelpress never modifies its input)")
    found = discover(list(inputs), exclude=outdir)
    plan = BatchPlan(found.base, outdir, models_in_tree=len(found.models),
                     shard=None if shard is None else f"{shard[0]}/{shard[1]}")
    plan.refused = [Refusal(str(r.rel), r.reason) for r in found.refused]
    inputs_real = {_real(f) for m in found.models for f in m.files}
    inputs_real |= {_real(o.src) for o in found.others}
    for model in shard_slice(found.models, shard):
        dst = outdir / model.rel
        config_dst = outdir / model.rel.parent / "config.json" if model.config else None
        task = Task(rel=str(model.rel), kind=model.kind, src=model.src, dst=dst, outdir=outdir,
                    parts=model.parts, config_src=model.config, config_dst=config_dst,
                    nbytes=model.nbytes)
        try:
            if model.problem:
                raise ModelReadError(model.problem)
            for path in [dst] + ([config_dst] if config_dst else []):
                check_inside(path, outdir)
                if _real(path) in inputs_real:
                    raise ModelWriteError(f"{path}: output would overwrite an input file; "
                                          "choose an output folder outside the input tree")
        except ModelpressError as exc:
            plan.blocked.append(ModelResult(str(model.rel), str(dst), model.kind, FAILED,
                                            str(exc), model.nbytes))
            continue
        plan.tasks.append(task)
    for other in shard_slice(found.others, shard):
        plan.copies.append(CopyTask(str(other.rel), other.src, outdir / other.rel, outdir))
    return plan


def recipe_sha256(recipe: Recipe, options: Options,
                  onnx_options: OnnxWriteOptions = OnnxWriteOptions(),
                  safetensors_options: SafetensorsWriteOptions = SafetensorsWriteOptions()
                  ) -> str:
    """sha256 of the recipe and the run and writer options that change output bytes
    (canonical JSON)."""
    kept = {k: v for k, v in dataclasses.asdict(options).items() if k not in RUN_ONLY_OPTIONS}
    # The writer settings under the names they had as fields of Options, so outputs
    # (whose metadata records this digest) stay byte-identical and --skip-existing
    # still recognizes outputs written before they moved.
    target = onnx_options.target
    kept.update(max_shard_size=safetensors_options.max_shard_size,
                external_data=onnx_options.external_data, onnx_target=target.target,
                onnx_int4=target.int4, accuracy_level=target.accuracy_level,
                onnx_int8=target.int8, calibration=None)
    doc = {"recipe": recipe.get_config(), "options": kept}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def memory_need(task: Task) -> int:
    """Estimated peak memory of one job compressing `task` (bytes)."""
    return _BASE_NEED + _NEED_FACTOR.get(task.kind, 10) * task.nbytes


def available_memory() -> int | None:
    """Memory available to new processes: MemAvailable, capped by a cgroup v2 limit."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


def default_jobs(tasks: list[Task]) -> int:
    """CPU count, at most one job per model, and no more jobs than memory holds.

    Memory per job is `memory_need` of the largest model (any job may get it).
    """
    return jobs_explained(tasks)[0]


def jobs_explained(tasks: list[Task]) -> tuple[int, str]:
    """The default number of jobs and the figures it came from."""
    if not tasks:
        return 1, "no models"
    cpus = default_threads()
    jobs = min(cpus, len(tasks))
    why = f"{cpus} CPUs, {len(tasks)} models"
    free = available_memory()
    if free is not None:
        need = max(memory_need(t) for t in tasks)
        jobs = min(jobs, free // need)
        why += f", {free / 1e9:.1f} GB available / {need / 1e9:.2f} GB per job"
    return max(1, jobs), why


def run_batch(plan: BatchPlan, recipe: Recipe, options: Options = Options(),
              batch: BatchOptions = BatchOptions(),
              on_event: OnEvent | None = None, *,
              onnx_options: OnnxWriteOptions = OnnxWriteOptions(),
              safetensors_options: SafetensorsWriteOptions = SafetensorsWriteOptions()
              ) -> BatchReport:
    """Compress every model of the plan and copy its other files; never raises for a model.

    With more than one job, worker processes are started with multiprocessing's
    "spawn" start method, which imports the main module again: a script that
    calls this must do so under `if __name__ == "__main__":`.
    """
    if batch.executor is not None:
        return batch.executor.run_batch(plan, recipe, options, batch, on_event,
                                        onnx_options=onnx_options,
                                        safetensors_options=safetensors_options)
    jobs, why = (batch.jobs, "") if batch.jobs else jobs_explained(plan.tasks)
    if options.threads is None:  # jobs share the CPUs: threads per model = CPUs / jobs
        options = dataclasses.replace(options, threads=max(1, default_threads() // jobs))
    job = JobSpec(recipe, options,
                  recipe_sha256(recipe, options, onnx_options, safetensors_options),
                  batch.skip_existing, onnx_options, safetensors_options)
    report = BatchReport(base=str(plan.base), outdir=str(plan.outdir), recipe=recipe.get_config(),
                         jobs=jobs, shard=plan.shard, refused=list(plan.refused))
    if why:
        report.notes.append(f"{jobs} parallel jobs by default ({why}); set with --jobs")
    if plan.shard:
        report.notes.append(f"shard {plan.shard}: {len(plan.tasks) + len(plan.blocked)} of "
                            f"{plan.models_in_tree} models")
    emit = on_event or (lambda event: None)
    emit(("plan", len(plan.tasks) + len(plan.blocked), len(plan.copies)))
    models, copies = run_copies_and_models(plan, job, jobs, batch, emit)
    report.models = sorted(models + plan.blocked, key=lambda m: m.path)
    report.copies = sorted(copies, key=lambda c: c.path)
    return report


@dataclass
class DryRow:
    """What a batch run would do with one model or file."""

    path: str
    kind: str
    action: str            # compress, skip, copy, fail
    bytes_before: int
    bytes_after: int | None  # estimated for compress, actual for skip/copy
    note: str = ""


def dry_run(plan: BatchPlan, recipe: Recipe, options: Options = Options(),
            skip_existing: bool = False, *,
            onnx_options: OnnxWriteOptions = OnnxWriteOptions(),
            safetensors_options: SafetensorsWriteOptions = SafetensorsWriteOptions()
            ) -> list[DryRow]:
    """The actions and sizes of a run, without writing; compressed sizes are estimates."""
    sha = recipe_sha256(recipe, options, onnx_options, safetensors_options)
    rows = [DryRow(m.path, m.kind, "fail", m.bytes_before, None, m.reason) for m in plan.blocked]
    for task in plan.tasks:
        try:
            if skip_existing:
                extra = list(task.parts) + ([task.config_src] if task.config_src else [])
                if up_to_date(task.dst, sha, input_key(task.src, extra), task.config_src,
                              task.config_dst):
                    rows.append(DryRow(task.rel, task.kind, "skip", task.nbytes,
                                       output_bytes(task.dst), "up to date"))
                    continue
            guess = estimate(open_model(task.src), recipe, options)
            note = f"{guess.tensors} tensors"
            if guess.unknown_stages:
                note += f"; no size rule for {', '.join(guess.unknown_stages)} (assumed unchanged)"
            if guess.from_values:
                note += (f"; {', '.join(guess.from_values)} chooses int8 group sizes from the "
                         "weights (estimated at the longest it may choose, max(16, K/5) up to "
                         "128: the file may be a little larger)")
            rows.append(DryRow(task.rel, task.kind, "compress", guess.bytes_before,
                               guess.bytes_after, note))
        except ModelpressError as exc:
            rows.append(DryRow(task.rel, task.kind, "fail", task.nbytes, None,
                               str(exc).removeprefix(f"{task.src}: ")))
    for copy in plan.copies:
        size = file_size(copy.src)
        same = skip_existing and same_file_content(copy.src, copy.dst)
        rows.append(DryRow(copy.rel, "file", "skip" if same else "copy", size, size,
                           "identical copy exists" if same else ""))
    rows += [DryRow(r.path, "-", "fail", 0, None, r.reason) for r in plan.refused]
    return sorted(rows, key=lambda r: r.path)


__all__ = ["BatchOptions", "BatchPlan", "CANCELLED", "DryRow", "OK", "SKIPPED", "available_memory",
           "Executor", "default_jobs", "dry_run", "jobs_explained", "memory_need", "parse_shard",
           "plan_batch", "recipe_sha256", "run_batch", "shard_slice"]
