"""Running a batch plan: models in worker processes (or in this one), copies in this one.

Worker processes are started with "spawn": each is a fresh interpreter, which
is safe with libraries that hold threads or locks (onnxruntime, BLAS), unlike
forking this process. Starting one returns at once (it imports modelpress on
its own), so this process never waits for a worker to come up, and a worker
still starting when the last model is done is simply ended. Largest models
are queued first so the slowest model does not start last. Events from every consumer arrive through
one queue and are passed on from this process's main thread only.
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_module
import threading
import time
from typing import Any, Callable, Iterator

from .batch_report import FAILED, OK, SKIPPED, CopyResult, ModelResult
from .batch_worker import (CANCELLED, JobSpec, Task, consume, run_task, use_in_process,
                           worker_main)

Emit = Callable[[tuple[Any, ...]], None]
_POLL_SECONDS = 0.05


def run_copies_and_models(plan: Any, job: JobSpec, jobs: int, batch: Any,
                          emit: Emit) -> tuple[list[ModelResult], list[CopyResult]]:
    """Run every task of `plan`; returns the model rows and the copy rows."""
    tasks = sorted(plan.tasks, key=lambda t: (-t.nbytes, t.rel))
    jobs = min(jobs, len(tasks))    # never more consumers than models
    if jobs <= 1:
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
    """`jobs` consumers of one shared queue of models: a thread here and `jobs - 1` processes.

    This process is already warm (modelpress imported), so its thread starts on
    the largest model at once. Worker processes are started only once the run
    has lasted `batch.start_delay` seconds: starting one costs more than a
    whole batch of small models takes. Each consumer takes the next model when it is
    free, so no model waits for a worker that is still starting.
    """
    context = _context()
    todo, events, cancel = context.Queue(), context.Queue(), context.Event()
    for task in tasks:
        todo.put(task)
    for _ in range(jobs):           # one end marker per consumer
        todo.put(None)
    results: dict[str, ModelResult] = {}
    holders: dict[str, int] = {}    # model -> pid of the process working on it
    launcher = _Launcher(context, jobs - 1 if batch.run_here else jobs, jobs,
                         (todo, events, cancel, job))
    began = time.monotonic()

    def handle(event: tuple[Any, ...]) -> None:
        if event[0] == "taken":
            holders[event[1]] = event[2]
            emit(event)
        elif event[0] == "result":
            record(event[1])
        else:
            emit(event)

    def record(row: ModelResult) -> None:
        holders.pop(row.path, None)
        results[row.path] = row
        emit(("model", row))
        if row.status == FAILED and batch.fail_fast:
            cancel.set()

    def pump(timeout: float) -> None:
        try:
            handle(events.get(timeout=timeout) if timeout else events.get_nowait())
            while True:
                handle(events.get_nowait())
        except queue_module.Empty:
            pass
        for worker in launcher.started():
            if worker.exitcode is not None:   # its last events were flushed before it ended
                for rel in [r for r, pid in holders.items() if pid == worker.pid]:
                    task = next(t for t in tasks if t.rel == rel)
                    record(ModelResult(rel, str(task.dst), task.kind, FAILED,
                                       f"worker process ended unexpectedly (exit code "
                                       f"{worker.exitcode}); out of memory? run with fewer "
                                       "--jobs", task.nbytes))
        if time.monotonic() - began >= batch.start_delay and len(results) < len(tasks):
            launcher.begin()

    use_in_process(events.put, cancel)
    local = threading.Thread(target=consume, args=(todo, events, job), daemon=True)
    if batch.run_here:
        local.start()
    else:
        launcher.begin()
    try:
        copies = _copy_all(plan.copies, batch, cancel, emit, between=lambda: pump(0))
        while len(results) < len(tasks):
            pump(_POLL_SECONDS)
    except BaseException:
        cancel.set()  # Ctrl-C: running models stop at their next tensor and clean up
        launcher.stop()
        launcher.join()
        while local.is_alive() or any(w.is_alive() for w in launcher.started()):
            pump(_POLL_SECONDS)
        raise
    finally:
        launcher.stop()
        use_in_process(None, None)
    if batch.run_here:
        local.join()
    # Every model is done: workers still starting or idle hold none, and must be gone
    # before this process removes the queues' semaphores at exit.
    launcher.join()
    for worker in launcher.started():
        if worker.is_alive():
            worker.terminate()
        worker.join()
    return [results[t.rel] for t in tasks], copies


class _Launcher:
    """Starts the worker processes (once) from a thread, so this one keeps handling events."""

    def __init__(self, context: Any, count: int, jobs: int, args: tuple[Any, ...]) -> None:
        self.context, self.count, self.jobs, self.args = context, count, jobs, args
        self._workers: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        """Start the workers (once)."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Start no more workers."""
        self._stop.set()

    def join(self) -> None:
        """Wait until no worker is being started."""
        if self._thread is not None:
            self._thread.join()

    def started(self) -> list[Any]:
        """The worker processes started so far."""
        with self._lock:
            return list(self._workers)

    def _run(self) -> None:
        with _worker_threads(self.jobs):
            for _ in range(self.count):
                if self._stop.is_set():
                    return
                worker = self.context.Process(target=worker_main, args=self.args, daemon=True)
                worker.start()
                with self._lock:
                    self._workers.append(worker)


_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _worker_threads(jobs: int) -> Iterator[None]:
    """Give worker processes an equal share of the CPUs for their math libraries' threads.

    BLAS libraries start one thread per CPU in every process; with several
    processes those threads compete and spin (measured: twice the CPU time on
    the sample models). The variables are read when a process loads the
    library, so they are set while the workers (and their server) start. A
    value the user set is kept.
    """
    from .batch import cpu_count
    share = str(max(1, cpu_count() // jobs))
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    for name in _THREAD_VARIABLES:
        os.environ.setdefault(name, share)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _context() -> Any:
    import multiprocessing
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
