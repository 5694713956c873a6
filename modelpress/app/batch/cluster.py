"""Batch runs on a Dask `distributed` cluster (`--executor dask`): every model is one task.

`DaskExecutor.run_batch` takes the same plan as the local pool and returns the
same `BatchReport`. Without a scheduler address it starts a `LocalCluster` of
worker processes on this machine (one model at a time each), so the same
command works on a laptop; with one (`tcp://host:8786`) it joins a running
cluster, whose workers must import modelpress and reach the input and output
paths under the same names as this process.

- Each task asks for its model's memory need (`plan.memory_need`, the local
  pool's estimate) as the worker resource `MEMORY`, so a worker started with
  `--resources MEMORY=<bytes>` never runs more models than that holds.
- A worker that dies mid-model (killed, out of memory) has its task run again
  on another worker by the scheduler, at most `distributed.scheduler.
  allowed-failures` times (this executor sets it for the clusters it
  starts); the writers' temporary names keep a partial file away from the
  output name. After that the model is reported failed.
- Progress events ("start", "progress", "done", "taken") travel from the
  workers through the scheduler's event log (one topic per run) and reach
  `on_event` from this process's main thread, like the local pool's.
- `--fail-fast` and Ctrl-C set a cluster-wide `distributed.Event`: tasks not
  yet started return at once as not run, running ones stop at their next
  tensor and remove their temporary files.

The other files of the tree are copied by this process, as the local pool does.
`distributed` is an optional dependency (`pip install 'modelpress[dask]'`),
imported only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import dask
from distributed import Client, Event, KilledWorker, LocalCluster, as_completed, get_worker, wait

from modelpress.app.batch.plan import (BatchOptions, BatchPlan, OnEvent, available_memory,
                                       jobs_explained, memory_need, recipe_sha256)
from modelpress.app.batch.pool import worker_threads
from modelpress.app.batch.report import FAILED, SKIPPED, BatchReport, ModelResult
from modelpress.app.batch.runner import run_copies_and_models
from modelpress.app.batch.worker import CANCELLED, JobSpec, Task, run_task, use_in_process
from modelpress.core.errors import ModelpressError
from modelpress.core.pipeline import Options, default_threads
from modelpress.formats.onnx.options import OnnxWriteOptions
from modelpress.formats.safetensors.options import SafetensorsWriteOptions
from modelpress.core.recipe import Recipe

RESOURCE = "MEMORY"
"""The worker resource a task's memory need is counted against (bytes)."""

HOLD_VARIABLE = "MODELPRESS_TEST_HOLD_WRITE"
"""Test hook: a folder. The first model caught writing (a temporary output file exists)
writes its worker's pid to FOLDER/held and waits there, so a test can kill that worker
mid-write at a known point."""

_POLL_SECONDS = 0.05
_CANCEL_POLL_SECONDS = 0.5   # how often a running model asks the scheduler whether to stop
_CONNECT_SECONDS = 30
_WORKERS_SECONDS = 60        # how long a joined cluster may take to show its first worker
_STOP_SECONDS = 30           # after Ctrl-C: how long running models get to clean up
_HOLD_SECONDS = 120


class ClusterError(ModelpressError):
    """The Dask cluster could not be started or reached, or distributed is missing."""


@dataclass(frozen=True)
class DaskExecutor:
    """Run each model of a batch as a task on a Dask cluster (`BatchOptions(executor=...)`)."""

    scheduler: str | None = None   # None: start a LocalCluster of processes on this machine
    # Worker deaths a model may cause before it is reported failed, on a LocalCluster this
    # executor starts (a running scheduler keeps its own distributed.scheduler.allowed-failures).
    allowed_failures: int = 2

    def run_batch(self, plan: BatchPlan, recipe: Recipe, options: Options,
                  batch: BatchOptions, on_event: OnEvent | None = None, *,
                  onnx_options: OnnxWriteOptions = OnnxWriteOptions(),
                  safetensors_options: SafetensorsWriteOptions = SafetensorsWriteOptions()
                  ) -> BatchReport:
        """Compress every model of the plan on the cluster and copy the other files here."""
        # threads are not part of it
        sha = recipe_sha256(recipe, options, onnx_options, safetensors_options)
        jobs = max(1, min(batch.jobs or jobs_explained(plan.tasks)[0], len(plan.tasks)))
        if self.scheduler is None and options.threads is None:
            options = dataclasses.replace(options, threads=max(1, default_threads() // jobs))
        job = JobSpec(recipe, options, sha, batch.skip_existing, onnx_options, safetensors_options)
        emit = on_event or (lambda event: None)
        emit(("plan", len(plan.tasks) + len(plan.blocked), len(plan.copies)))
        with self._client(jobs) as client:
            run = _ClusterRun(client, plan, job, batch, emit, self.scheduler is None)
            models, copies = run.run()
        report = BatchReport(base=str(plan.base), outdir=str(plan.outdir),
                             recipe=recipe.get_config(), jobs=run.threads, shard=plan.shard,
                             refused=list(plan.refused))
        report.notes += run.notes
        if self.scheduler is not None and batch.jobs:
            report.notes.append("--jobs is ignored on a running cluster: its workers and "
                                "their threads decide how many models run at once")
        if plan.shard:
            report.notes.append(f"shard {plan.shard}: {len(plan.tasks) + len(plan.blocked)} of "
                                f"{plan.models_in_tree} models")
        report.models = sorted(models + plan.blocked, key=lambda m: m.path)
        report.copies = sorted(copies, key=lambda c: c.path)
        return report

    @contextlib.contextmanager
    def _client(self, jobs: int) -> Iterator[Any]:
        if self.scheduler is not None:
            try:
                client = Client(self.scheduler, timeout=_CONNECT_SECONDS)
            except (OSError, TimeoutError, ValueError) as exc:
                raise ClusterError(f"cannot reach the Dask scheduler at {self.scheduler} "
                                   f"({exc}); start one with `dask scheduler` and give the "
                                   "address it prints") from None
            try:
                yield client
            finally:
                client.close()
            return
        free = available_memory()
        resources = {RESOURCE: free // jobs} if free else {}
        with dask.config.set({"distributed.scheduler.allowed-failures": self.allowed_failures}), \
                worker_threads(jobs):
            try:
                cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=":0",
                                       silence_logs=logging.ERROR, resources=resources)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(f"cannot start a local Dask cluster ({exc})") from None
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()


class _ClusterRun:
    """One batch on one cluster: submit, copy, collect, and pass events on."""

    def __init__(self, client: Any, plan: BatchPlan, job: JobSpec, batch: BatchOptions,
                 emit: OnEvent, local: bool) -> None:
        self.client, self.plan, self.job, self.batch, self.emit = client, plan, job, batch, emit
        self.local = local
        self.run_id = f"modelpress-{uuid.uuid4().hex[:12]}"
        self.stop = Event(self.run_id, client=client)
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.notes: list[str] = []
        self.threads = 0

    def run(self) -> tuple[list[ModelResult], list[Any]]:
        """Rows of the models (in plan order) and of the copies."""
        tasks = sorted(self.plan.tasks, key=lambda t: (-t.nbytes, t.rel))  # largest first
        resources = self._resources(tasks) if tasks else {}
        self.client.subscribe_topic(self.run_id, self._on_cluster_event)
        hold = os.environ.get(HOLD_VARIABLE)
        futures = [self.client.submit(compress_on_worker, task, self.job, self.run_id, hold,
                                      self.batch.fail_fast,
                                      key=f"{self.run_id}-{i}", priority=len(tasks) - i,
                                      resources=resources.get(task.rel), pure=False)
                   for i, task in enumerate(tasks)]
        try:
            copies = self._copies()
            rows = self._collect(dict(zip(futures, tasks)))
        except BaseException:
            self._stop_all(futures)
            raise
        finally:
            with contextlib.suppress(Exception):   # a lost connection is reported already
                self.client.unsubscribe_topic(self.run_id)
                self.stop.clear()
        return [rows[t.rel] for t in tasks], copies

    def _resources(self, tasks: list[Task]) -> dict[str, dict[str, float]]:
        """Each task's resource request, from the workers the scheduler knows now."""
        try:
            self.client.wait_for_workers(1, timeout=_WORKERS_SECONDS)
        except TimeoutError:
            raise ClusterError(f"no Dask worker joined the scheduler within {_WORKERS_SECONDS} s; "
                               "start `dask worker ADDRESS` on each node") from None
        workers = list(self.client.scheduler_info(n_workers=-1)["workers"].values())
        self.threads = sum(w.get("nthreads", 1) for w in workers)
        where = "a local Dask cluster" if self.local else \
            f"the Dask cluster at {self.client.scheduler.address}"
        self.notes.append(f"ran on {where}: {len(workers)} workers, {self.threads} threads, "
                          "one task per model")
        requests, notes = task_resources(tasks, workers)
        self.notes += notes
        return requests

    def _on_cluster_event(self, event: tuple[float, Any]) -> None:
        # Called on the client's event loop thread; the main thread passes events on.
        self.events.put(tuple(event[1]))

    def _pump(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            self.emit(event)

    def _copies(self) -> list[Any]:
        """The other files, copied by this process while the cluster compresses."""
        rows: list[Any] = []
        if self.plan.copies:
            only_copies = dataclasses.replace(self.plan, tasks=[])
            _, rows = run_copies_and_models(only_copies, self.job, 1, self.batch, self._emit_copy)
            if self.batch.fail_fast and any(r.status == FAILED for r in rows):
                self.stop.set()
        return rows

    def _emit_copy(self, event: tuple[Any, ...]) -> None:
        self._pump()
        self.emit(event)

    def _collect(self, futures: dict[Any, Task]) -> dict[str, ModelResult]:
        rows: dict[str, ModelResult] = {}
        done = as_completed(list(futures))
        while len(rows) < len(futures):
            self._pump()
            ready = done.next_batch(block=False) if done.has_ready() else []
            if not ready:
                time.sleep(_POLL_SECONDS)
            for future in ready:
                row = _row(future, futures[future])
                rows[row.path] = row
                self._pump()
                self.emit(("model", row))
                if row.status == FAILED and self.batch.fail_fast:
                    self.stop.set()    # the models not yet done return as not run
        self._pump()
        return rows

    def _stop_all(self, futures: list[Any]) -> None:
        """Interrupted: running models stop at their next tensor and clean up, then go."""
        with contextlib.suppress(Exception):
            self.stop.set()
            wait(futures, timeout=_STOP_SECONDS)
        with contextlib.suppress(Exception):
            self.client.cancel(futures)


def task_resources(tasks: list[Task],
                   workers: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Each task's MEMORY request (by model path) for these workers (the scheduler's
    descriptions), and notes for the report.

    A request no worker could grant would leave its task waiting for ever, so the
    workers' resources decide: none declares MEMORY, no requests; a need above every
    worker's MEMORY asks for the largest, so that model runs alone there.
    """
    held = [h for h in (w.get("resources", {}).get(RESOURCE) for w in workers) if h]
    if not held:
        return {}, [f"the workers declare no {RESOURCE} resource, so each takes as many models "
                    f"as it has threads; start them with --resources {RESOURCE}=BYTES to bound "
                    "that by the models' memory needs"]
    largest = max(held)
    notes = []
    over = sum(1 for t in tasks if memory_need(t) > largest)
    if over:
        notes.append(f"{over} of {len(tasks)} models need more than the largest worker's "
                     f"{RESOURCE} ({largest / 1e9:.2f} GB) by the estimate; each of them runs "
                     "alone on such a worker")
    return {t.rel: {RESOURCE: min(memory_need(t), largest)} for t in tasks}, notes


def _row(future: Any, task: Task) -> ModelResult:
    """The model's row from its finished, failed or cancelled task."""
    if future.status == "finished":
        return future.result()
    row = ModelResult(task.rel, str(task.dst), task.kind, FAILED, bytes_before=task.nbytes)
    if future.status == "cancelled":
        row.status, row.reason = SKIPPED, CANCELLED
        return row
    exc = future.exception()
    if isinstance(exc, KilledWorker):
        row.reason = ("the Dask workers compressing it died each time (out of memory? give "
                      f"the workers more memory or --resources {RESOURCE}=BYTES)")
    elif isinstance(exc, ImportError):
        row.reason = (f"the Dask worker cannot import modelpress ({exc}); install "
                      "'modelpress[dask]', the same version as here, on every worker")
    else:
        row.reason = f"internal error on the Dask worker: {type(exc).__name__}: {exc}"
    return row


# -- on the worker --------------------------------------------------------------------------

_LOCAL = threading.local()   # this task thread's event sink and stop flag


def compress_on_worker(task: Task, job: JobSpec, run_id: str, hold: str | None = None,
                       fail_fast: bool = False) -> ModelResult:
    """The task: compress one model on a Dask worker; never raises for a bad model.

    With `fail_fast`, a failure sets the run's stop flag from here, before the row
    travels back, so no worker starts another model in the meantime."""
    worker = get_worker()
    if job.options.threads is None:   # a joined cluster: this worker's CPUs over its threads
        threads = max(1, default_threads() // max(1, worker.state.nthreads))
        job = dataclasses.replace(job, options=dataclasses.replace(job.options, threads=threads))
    _LOCAL.emit = lambda event: worker.log_event(run_id, list(event))
    _LOCAL.stop = _Stop(run_id, task, hold)
    # The worker module keeps one sink per process; ours dispatches per task thread, so
    # workers with several threads (and several runs) keep each model's events apart.
    use_in_process(_thread_emit, _THREAD_STOP)
    try:
        _thread_emit(("taken", task.rel, os.getpid()))
        row = run_task(task, job)
        if fail_fast and row.status == FAILED:
            _LOCAL.stop.event.set()
        return row
    finally:
        _LOCAL.emit = _LOCAL.stop = None


def _thread_emit(event: tuple[Any, ...]) -> None:
    emit = getattr(_LOCAL, "emit", None)
    if emit is not None:
        emit(event)


class _ThreadStop:
    """The stop flag `run_task` checks before the model and at every tensor."""

    def is_set(self) -> bool:
        stop = getattr(_LOCAL, "stop", None)
        return stop is not None and stop.is_set()


_THREAD_STOP = _ThreadStop()


class _Stop:
    """This run's cluster-wide stop flag, asked at most every 0.5 s (a scheduler round trip)."""

    def __init__(self, run_id: str, task: Task, hold: str | None) -> None:
        self.event = Event(run_id)
        self.task, self.hold = task, hold
        self.flag = False
        self.next = 0.0

    def is_set(self) -> bool:
        if self.hold:
            self._hold()
        now = time.monotonic()
        if not self.flag and now >= self.next:
            self.next = now + _CANCEL_POLL_SECONDS
            self.flag = self.event.is_set()
        return self.flag

    def _hold(self) -> None:
        """Test hook (HOLD_VARIABLE): wait while writing, once per run, to be killed."""
        folder = self.task.dst.parent
        if not isinstance(folder, Path) or not any(folder.glob(".*.modelpress-tmp")):
            return
        folder, self.hold = Path(self.hold or ""), None
        try:
            fd = os.open(folder / "held", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return                     # another attempt held already: this one goes on
        os.write(fd, f"{os.getpid()} {self.task.rel}".encode())
        os.close(fd)
        time.sleep(_HOLD_SECONDS)


__all__ = ["ClusterError", "DaskExecutor", "HOLD_VARIABLE", "RESOURCE", "compress_on_worker",
           "task_resources"]
