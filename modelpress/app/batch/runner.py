"""Running a batch plan: the models (here, or in parallel), and the copies of other files.

With one job everything runs in this process, copies first. With several,
`pool.run_parallel` compresses the models while this process copies
the other files; events from every consumer are passed on from this
process's main thread only.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from modelpress.app.batch.pool import ParallelRun, run_parallel
from modelpress.app.batch.report import FAILED, OK, SKIPPED, CopyResult, ModelResult
from modelpress.app.batch.worker import CANCELLED, JobSpec, Task, run_task, use_in_process
from modelpress.core.errors import ModelpressError
from modelpress.formats.location import file_size
from modelpress.formats.outputs import check_inside, copy_file, same_file_content

Emit = Callable[[tuple[Any, ...]], None]


def run_copies_and_models(plan: Any, job: JobSpec, jobs: int, batch: Any,
                          emit: Emit) -> tuple[list[ModelResult], list[CopyResult]]:
    """Run every task of `plan`; returns the model rows and the copy rows."""
    tasks = sorted(plan.tasks, key=lambda t: (-t.nbytes, t.rel))
    jobs = min(jobs, len(tasks))    # never more consumers than models
    if jobs <= 1:
        return _sequential(plan, tasks, job, batch, emit)

    def copies(run: ParallelRun) -> list[CopyResult]:
        # A failed copy with --fail-fast stops the models too (run.cancel).
        return _copy_all(plan.copies, batch, run.cancelled.is_set, run.cancel, emit,
                         between=lambda: run.pump(0))
    return run_parallel(tasks, job, jobs, batch, emit, copies)


def _sequential(plan: Any, tasks: list[Task], job: JobSpec, batch: Any,
                emit: Emit) -> tuple[list[ModelResult], list[CopyResult]]:
    cancel = threading.Event()
    use_in_process(emit, cancel)
    copies = _copy_all(plan.copies, batch, cancel.is_set, cancel.set, emit)
    models: list[ModelResult] = []
    try:
        for task in tasks:
            if cancel.is_set():
                models.append(_not_run(task))
                continue
            row = run_task(task, job)
            models.append(row)
            emit(("model", row))
            if row.status == FAILED and batch.fail_fast:
                cancel.set()
    finally:
        use_in_process(None, None)
    return models, copies


def _not_run(task: Task) -> ModelResult:
    return ModelResult(task.rel, str(task.dst), task.kind, SKIPPED, CANCELLED, task.nbytes)


def _copy_all(copies: list[Any], batch: Any, stopped: Callable[[], bool],
              stop: Callable[[], None], emit: Emit,
              between: Callable[[], None] | None = None) -> list[CopyResult]:
    """Copy the other files atomically; with --skip-existing an identical copy is kept."""
    rows = []
    for item in copies:
        if between:
            between()
        row = CopyResult(item.rel, str(item.dst), FAILED)
        if stopped():
            row.status, row.reason = SKIPPED, CANCELLED
        else:
            try:
                row.bytes = file_size(item.src)
                if batch.skip_existing and same_file_content(item.src, item.dst):
                    row.status, row.reason = SKIPPED, "identical copy exists"
                else:
                    check_inside(item.dst, item.outdir)
                    if isinstance(item.dst, Path):  # object storage has no folders to make
                        item.dst.parent.mkdir(parents=True, exist_ok=True)
                    copy_file(item.src, item.dst)
                    row.status = OK
            except ModelpressError as exc:
                row.reason = str(exc)
            except OSError as exc:
                row.reason = f"{item.src}: cannot copy ({exc.strerror or exc})"
            if row.status == FAILED and batch.fail_fast:
                stop()
        rows.append(row)
        emit(("copy", row))
    return rows
