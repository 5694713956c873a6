"""Running a batch plan: models in worker processes (or in this one), copies in this one.

Worker processes are started with the "spawn" method: a fresh interpreter
per worker is safe with libraries that hold threads or locks (onnxruntime,
BLAS), unlike fork. Largest models are submitted first so the slowest model
does not start last. Events from workers arrive through a queue and are passed
on from this process only.
"""

from __future__ import annotations

import queue as queue_module
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable

from .batch_report import FAILED, OK, SKIPPED, CopyResult, ModelResult
from .batch_worker import CANCELLED, JobSpec, Task, init_worker, run_task, use_in_process

Emit = Callable[[tuple[Any, ...]], None]
_POLL_SECONDS = 0.1


def run_copies_and_models(plan: Any, job: JobSpec, jobs: int, batch: Any,
                          emit: Emit) -> tuple[list[ModelResult], list[CopyResult]]:
    """Run every task of `plan`; returns the model rows and the copy rows."""
    tasks = sorted(plan.tasks, key=lambda t: (-t.nbytes, t.rel))
    if jobs <= 1 or len(tasks) <= 1:
        return _sequential(plan, tasks, job, batch, emit)
    return _parallel(plan, tasks, job, jobs, batch, emit)


def _sequential(plan: Any, tasks: list[Task], job: JobSpec, batch: Any,
                emit: Emit) -> tuple[list[ModelResult], list[CopyResult]]:
    cancel = threading.Event()
    use_in_process(emit, cancel)
    copies = _copy_all(plan.copies, batch, cancel, emit)
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


def _parallel(plan: Any, tasks: list[Task], job: JobSpec, jobs: int, batch: Any,
              emit: Emit) -> tuple[list[ModelResult], list[CopyResult]]:
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    cancel = context.Event()
    models: list[ModelResult] = []

    def drain() -> None:
        while True:
            try:
                emit(events.get_nowait())
            except queue_module.Empty:
                return

    def collect(done: set[Future], futures: dict[Future, Task]) -> None:
        for future in done:
            task = futures[future]
            if future.cancelled():
                row = _not_run(task)
            else:
                try:
                    row = future.result()
                except Exception as exc:  # the worker process died (killed, out of memory)
                    row = ModelResult(task.rel, str(task.dst), task.kind, FAILED,
                                      f"worker process ended unexpectedly ({type(exc).__name__}"
                                      "); out of memory? run with fewer --jobs", task.nbytes)
            models.append(row)
            emit(("model", row))
            if row.status == FAILED and batch.fail_fast and not cancel.is_set():
                cancel.set()
                for other in futures:
                    other.cancel()

    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=init_worker,
                             initargs=(events, cancel)) as pool:
        futures = {pool.submit(run_task, task, job): task for task in tasks}
        pending = set(futures)
        try:
            copies = _copy_all(plan.copies, batch, cancel, emit, between=drain)
            while pending:
                done, pending = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                drain()
                collect(done, futures)
        except BaseException:
            cancel.set()  # Ctrl-C: workers stop at their next tensor and clean up
            for future in futures:
                future.cancel()
            raise
        drain()
    return models, copies


def _not_run(task: Task) -> ModelResult:
    return ModelResult(task.rel, str(task.dst), task.kind, SKIPPED, CANCELLED, task.nbytes)


def _copy_all(copies: list[Any], batch: Any, cancel: Any, emit: Emit,
              between: Callable[[], None] | None = None) -> list[CopyResult]:
    """Copy the other files atomically; with --skip-existing an identical copy is kept."""
    from formats.outputs import check_inside, copy_file, same_file_content

    from .errors import ModelpressError
    rows = []
    for item in copies:
        if between:
            between()
        row = CopyResult(item.rel, str(item.dst), FAILED)
        if cancel.is_set():
            row.status, row.reason = SKIPPED, CANCELLED
        else:
            try:
                row.bytes = item.src.stat().st_size
                if batch.skip_existing and same_file_content(item.src, item.dst):
                    row.status, row.reason = SKIPPED, "identical copy exists"
                else:
                    check_inside(item.dst, item.outdir)
                    item.dst.parent.mkdir(parents=True, exist_ok=True)
                    copy_file(item.src, item.dst)
                    row.status = OK
            except ModelpressError as exc:
                row.reason = str(exc)
            except OSError as exc:
                row.reason = f"{item.src}: cannot copy ({exc.strerror or exc})"
            if row.status == FAILED and batch.fail_fast:
                cancel.set()
        rows.append(row)
        emit(("copy", row))
    return rows
