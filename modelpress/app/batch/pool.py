"""Models in parallel: a thread of this process and worker processes, fed one model at a time.

This process is already warm (modelpress imported), so its thread starts on
the largest model at once. Worker processes are started only once the run
has lasted `start_delay` seconds: starting one costs more than a whole batch
of small models takes. A worker gets its next model only after it said it is
ready or sent its last result, so no model waits for a worker that is still
starting, and the load stays balanced (largest models first).

Each worker talks to this process through a pipe of its own; no lock or
queue is shared between processes, so a worker that dies (killed, out of
memory) takes nothing down with it: its model is reported failed and the
others go on. Workers are started with "spawn", a fresh interpreter each,
which is safe with libraries that hold threads or locks (onnxruntime, BLAS),
unlike forking this process; a worker still starting when the last model is
done is simply ended.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator

from modelpress.app.batch.report import FAILED, SKIPPED, ModelResult
from modelpress.app.batch.worker import (CANCELLED, JobSpec, Task, run_task, use_in_process,
                                         worker_main)
from modelpress.core.pipeline import default_threads

Emit = Callable[[tuple[Any, ...]], None]
_POLL_SECONDS = 0.05
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class _Worker:
    """A worker process and this process's end of its pipe."""

    def __init__(self, context: Any, job: JobSpec) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, job), daemon=True)
        self.process.start()
        child.close()
        self.task: Task | None = None
        self.alive = True


class ParallelRun:
    """One batch of models over `jobs` consumers; `run()` returns a row per model."""

    def __init__(self, tasks: list[Task], job: JobSpec, jobs: int, batch: Any,
                 emit: Emit) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.tasks, self.job, self.jobs, self.batch, self.emit = tasks, job, jobs, batch, emit
        self.waiting = deque(tasks)
        self.lock = threading.Lock()
        self.results: dict[str, ModelResult] = {}
        self.workers: list[_Worker] = []
        self.launched = False
        self.cancelled = threading.Event()
        self.local_in, local_out = self.context.Pipe(duplex=False)
        self.local_out = local_out
        self.local = threading.Thread(target=self._local_loop, daemon=True)
        self.began = time.monotonic()

    # -- consumers -------------------------------------------------------------

    def next_task(self) -> Task | None:
        """The next model to compress, or None when there is none (or the run is stopped)."""
        with self.lock:
            if self.cancelled.is_set() or not self.waiting:
                return None
            return self.waiting.popleft()

    def _local_loop(self) -> None:
        use_in_process(self.local_out.send, self.cancelled)
        try:
            while (task := self.next_task()) is not None:
                self.local_out.send(("taken", task.rel, os.getpid()))
                self.local_out.send(("result", run_task(task, self.job)))
        finally:
            use_in_process(None, None)

    def _launch(self) -> None:
        self.launched = True
        count = self.jobs - 1 if self.batch.run_here else self.jobs
        with worker_threads(self.jobs):
            self.workers += [_Worker(self.context, self.job) for _ in range(count)]

    # -- the main loop ---------------------------------------------------------

    def start(self) -> None:
        """Start this process's consumer (or the workers, if this process does not compress)."""
        if self.batch.run_here:
            self.local.start()
        else:
            self._launch()

    def pump(self, timeout: float = _POLL_SECONDS) -> None:
        """Handle whatever the consumers sent, waiting at most `timeout` seconds."""
        if not self.launched and time.monotonic() - self.began >= self.batch.start_delay:
            self._launch()
        sources: dict[Any, Any] = {self.local_in: None}
        for worker in self.workers:
            if worker.alive:
                sources[worker.conn] = worker
                sources[worker.process.sentinel] = worker
        for ready in wait(list(sources), timeout):
            worker = sources[ready]
            if isinstance(ready, Connection):
                self._receive(ready, worker)
            elif worker.alive:             # the process ended: read what it sent last
                while worker.alive and worker.conn.poll():
                    self._receive(worker.conn, worker)
                self._died(worker)
        self._check_consumers()

    def _receive(self, conn: Connection, worker: _Worker | None) -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            if worker is not None:
                self._died(worker)
            return
        kind = message[0]
        if kind == "result":
            if worker is not None:
                worker.task = None
            self.record(message[1])
        elif kind == "ready":
            pass
        else:
            self.emit(message)
            return
        if worker is not None:             # ready or finished: give it the next model
            task = self.next_task()
            worker.task = task
            try:
                worker.conn.send(task)
            except OSError:
                self._died(worker)

    def _died(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        worker.process.join(1)
        task, worker.task = worker.task, None
        if task is not None and task.rel not in self.results:
            self.record(ModelResult(task.rel, str(task.dst), task.kind, FAILED,
                                    f"worker process ended unexpectedly (exit code "
                                    f"{worker.process.exitcode}); out of memory? run with fewer "
                                    "--jobs", task.nbytes))

    def _check_consumers(self) -> None:
        """With no consumer left (every worker died), the models not started have failed."""
        if self.local.is_alive() or any(w.alive for w in self.workers):
            return
        if self.batch.run_here and not self.launched and self.waiting:
            return                         # this process's thread has not started yet
        with self.lock:
            left, self.waiting = list(self.waiting), deque()
        for task in left:
            self.record(ModelResult(task.rel, str(task.dst), task.kind, FAILED,
                                    "not compressed: every worker process ended unexpectedly "
                                    "(out of memory? run with fewer --jobs)", task.nbytes))

    def record(self, row: ModelResult) -> None:
        """Keep a model's row; after a failure with --fail-fast, stop the run."""
        self.results[row.path] = row
        self.emit(("model", row))
        if row.status == FAILED and self.batch.fail_fast:
            self.cancel()

    def cancel(self) -> None:
        """Start no more models; running ones stop at their next tensor."""
        with self.lock:
            self.cancelled.set()
            left, self.waiting = list(self.waiting), deque()
        for worker in self.workers:
            if worker.alive and worker.task is not None:
                with contextlib.suppress(OSError):
                    worker.conn.send("cancel")
        for task in left:
            self.record(ModelResult(task.rel, str(task.dst), task.kind, SKIPPED, CANCELLED,
                                    task.nbytes))

    @property
    def finished(self) -> bool:
        """Every model has its row."""
        return len(self.results) == len(self.tasks)

    def busy(self) -> bool:
        """A consumer is still working on a model."""
        return self.local.is_alive() or any(w.alive and w.task is not None
                                            for w in self.workers)

    def close(self) -> None:
        """End the workers (none holds a model any more) and close the pipes."""
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
            worker.process.join()
            worker.conn.close()
        if self.local.is_alive():
            self.local.join()
        self.local_in.close()
        self.local_out.close()


def run_parallel(tasks: list[Task], job: JobSpec, jobs: int, batch: Any, emit: Emit,
                 during: Callable[[ParallelRun], Any]) -> tuple[list[ModelResult], Any]:
    """Compress `tasks` with `jobs` consumers; `during(run)` runs meanwhile (the copies),
    calling `run.pump(0)` now and then."""
    run = ParallelRun(tasks, job, jobs, batch, emit)
    run.start()
    try:
        extra = during(run)
        while not run.finished:
            run.pump()
    except BaseException:
        run.cancel()  # Ctrl-C: running models stop at their next tensor and clean up
        while run.busy():
            run.pump()
        raise
    finally:
        run.close()
    return [run.results[t.rel] for t in tasks], extra


@contextlib.contextmanager
def worker_threads(jobs: int) -> Iterator[None]:
    """Give worker processes an equal share of the CPUs for their math libraries' threads.

    BLAS libraries start one thread per CPU in every process; with several
    processes those threads compete and spin (measured: twice the CPU time on
    the sample models). The variables are read when a process loads the
    library, so they are set while the workers start. A value the user set is
    kept.
    """
    share = str(max(1, default_threads() // jobs))
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
