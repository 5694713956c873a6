"""Running a batch plan: models in worker processes (or in this one), copies in this one.

Worker processes come from a "forkserver" (where the platform has one, else
"spawn"): a fresh, single-threaded server process imports modelpress once and
forks each worker from it, which is safe with libraries that hold threads or
locks (onnxruntime, BLAS), unlike forking this process, and starts workers
without importing everything again. Largest models are submitted first so the
slowest model does not start last. Events from workers arrive through a queue and are passed
on from this process only.
"""

from __future__ import annotations

import queue as queue_module
import threading
from collections import deque
from concurrent.futures import (FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor,
                                wait)
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
    """`jobs` models at a time: one in this process (a thread), the rest in worker processes.

    This process is already warm (modelpress imported), so it starts on the
    largest model at once while the workers start; each worker holds one model
    at a time and takes the next one when free, so the load stays balanced.
    """
    context = _context()
    events = context.Queue()
    cancel = context.Event()
    local_events: queue_module.Queue = queue_module.Queue()
    waiting = deque(tasks)
    running: dict[Future, tuple[Task, bool]] = {}   # future -> (task, runs in this process)
    models: list[ModelResult] = []

    def drain() -> None:
        for source in (local_events, events):
            while True:
                try:
                    emit(source.get_nowait())
                except queue_module.Empty:
                    break

    def finish(future: Future, task: Task) -> None:
        try:
            row = future.result()
        except Exception as exc:  # the worker process died (killed, out of memory)
            row = ModelResult(task.rel, str(task.dst), task.kind, FAILED,
                              f"worker process ended unexpectedly ({type(exc).__name__}); "
                              "out of memory? run with fewer --jobs", task.nbytes)
        models.append(row)
        emit(("model", row))
        if row.status == FAILED and batch.fail_fast:
            cancel.set()

    def refill(pool: ProcessPoolExecutor, local: ThreadPoolExecutor) -> None:
        if cancel.is_set():
            return
        if waiting and not any(here for _, here in running.values()):
            task = waiting.popleft()
            running[local.submit(run_task, task, job)] = (task, True)
        while waiting and sum(not here for _, here in running.values()) < jobs - 1:
            task = waiting.popleft()
            running[pool.submit(run_task, task, job)] = (task, False)

    def step(pool: ProcessPoolExecutor, local: ThreadPoolExecutor, timeout: float) -> None:
        done = wait(list(running), timeout=timeout, return_when=FIRST_COMPLETED)[0] \
            if running else set()
        drain()
        for future in done:
            finish(future, running.pop(future)[0])
        refill(pool, local)

    use_in_process(local_events.put, cancel)
    try:
        with ProcessPoolExecutor(max_workers=jobs - 1, mp_context=context,
                                 initializer=init_worker, initargs=(events, cancel)) as pool, \
                ThreadPoolExecutor(max_workers=1) as local:
            try:
                refill(pool, local)
                copies = _copy_all(plan.copies, batch, cancel, emit,
                                   between=lambda: step(pool, local, 0))
                while running:
                    step(pool, local, _POLL_SECONDS)
            except BaseException:
                cancel.set()  # Ctrl-C: running models stop at their next tensor and clean up
                raise
    finally:
        use_in_process(None, None)
    drain()
    for task in waiting:  # never started: --fail-fast stopped the run
        row = _not_run(task)
        models.append(row)
        emit(("model", row))
    return models, copies


_PRELOAD = ["compress_core.batch_worker", "compress_core.api", "formats", "formats.outputs",
            "formats.ct_config"]


def _context() -> Any:
    import multiprocessing
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


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
