"""One model of a batch, as a worker process (or the main process with one job) runs it.

Everything here is plain data in and out, so it crosses process boundaries:
a `Task` names the files, a `JobSpec` carries the recipe and what to do, and
the result is a `ModelResult`. Progress goes to an event sink (a worker's
pipe to the parent); a cancel flag (in a worker, a "cancel" message on that
pipe) stops a model at its next tensor, and the atomic writers then remove
their temporary files.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from modelpress.app.api import compress
from modelpress.app.batch.report import FAILED, OK, SKIPPED, ModelResult
from modelpress.core.errors import ModelpressError
from modelpress.core.pipeline import Options
from modelpress.core.recipe import Recipe
from modelpress.formats.digest import file_sha256
from modelpress.formats.location import AnyPath
from modelpress.formats.onnx.options import OnnxWriteOptions
from modelpress.formats.outputs import (SOURCE_KEY, check_inside, input_key, output_bytes,
                                        source_value, up_to_date)
from modelpress.formats.safetensors.ct_config import loads_in_transformers, write_config
from modelpress.formats.safetensors.options import SafetensorsWriteOptions

Emit = Callable[[tuple[Any, ...]], None]
_PROGRESS_SECONDS = 0.1
CANCELLED = "not finished: the run was stopped (--fail-fast after a failure, or interrupted)"


@dataclass(frozen=True)
class Task:
    """One model to compress: input files and output paths (absolute)."""

    rel: str
    kind: str
    src: AnyPath
    dst: AnyPath
    outdir: AnyPath
    parts: tuple[AnyPath, ...] = ()
    config_src: AnyPath | None = None
    config_dst: AnyPath | None = None
    nbytes: int = 0


@dataclass(frozen=True)
class JobSpec:
    """What every task of a run does: the recipe, options and run flags."""

    recipe: Recipe
    options: Options
    recipe_sha256: str
    skip_existing: bool = False
    onnx_options: OnnxWriteOptions = OnnxWriteOptions()
    safetensors_options: SafetensorsWriteOptions = SafetensorsWriteOptions()


class Cancelled(Exception):
    """The run was stopped while this model was in progress."""


@dataclass
class _State:
    emit: Emit | None = None
    cancel: Any = None              # threading.Event or multiprocessing Event


_STATE = _State()


def init_worker(conn: Any) -> None:
    """Set up a worker process: events and cancel through its pipe, and exit with its parent.

    Workers ignore Ctrl-C (the parent turns it into a cancel) and end as soon
    as the parent process is gone, even if it was killed (SIGKILL), so no
    orphan keeps writing.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _STATE.emit = conn.send
    _STATE.cancel = _PipeCancel(conn)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


class _PipeCancel:
    """The cancel flag of a worker: a "cancel" message from the parent while a model runs."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.flag = False

    def is_set(self) -> bool:
        # While a model runs the parent sends nothing but "cancel".
        if not self.flag and self.conn.poll():
            self.flag = self.conn.recv() == "cancel"
        return self.flag


def worker_main(conn: Any, job: JobSpec) -> None:
    """A worker process: say it is ready, then compress each model the parent sends."""
    init_worker(conn)
    _warm_up()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        if task == "cancel":       # arrived after its model had finished
            continue
        conn.send(("taken", task.rel, os.getpid()))
        conn.send(("result", run_task(task, job)))


def _warm_up() -> None:
    """Import what compressing an ONNX model needs before saying ready.

    The formats layer imports onnx only when an ONNX model is opened, and its
    checker and version converter only when one is written; otherwise a fresh
    worker's first model pays these imports (0.1-0.5 s), and a worker that
    takes a model while still slow can finish after this process would have
    finished everything alone.
    """
    # onnx and its checker and converter, loaded here on purpose (see above)
    import modelpress.formats.onnx.store, onnx.checker, onnx.version_converter  # noqa: E401, F401


def _exit_with_parent(sentinel: int) -> None:
    wait([sentinel])
    os._exit(1)


def use_in_process(emit: Emit | None, cancel: Any) -> None:
    """Run tasks in this process (alone, or in a thread beside workers); events go to `emit`."""
    _STATE.emit = emit
    _STATE.cancel = cancel


def _send(event: tuple[Any, ...]) -> None:
    if _STATE.emit is not None:
        _STATE.emit(event)


def _check_cancel() -> None:
    if _STATE.cancel is not None and _STATE.cancel.is_set():
        raise Cancelled()


def run_task(task: Task, job: JobSpec) -> ModelResult:
    """Compress one model (or skip it if up to date); never raises for a bad model."""
    _send(("start", task.rel, task.nbytes))
    row = ModelResult(path=task.rel, output=str(task.dst), kind=task.kind, status=FAILED,
                      bytes_before=task.nbytes)
    try:
        _check_cancel()
        _compress(task, job, row)
    except Cancelled:
        row.status, row.reason = SKIPPED, CANCELLED
    except ModelpressError as exc:
        # The row names the model already; keep the message's file name only if it is another.
        reason = str(exc)
        row.status, row.reason = FAILED, reason.removeprefix(f"{task.src}: ")
    except MemoryError:
        row.status, row.reason = FAILED, "out of memory; run with fewer --jobs"
    except Exception as exc:  # a bug must not stop the other models
        row.status, row.reason = FAILED, f"internal error: {type(exc).__name__}: {exc}"
    _send(("done", task.rel, row.status))
    return row


def _compress(task: Task, job: JobSpec, row: ModelResult) -> None:
    extra = list(task.parts) + ([task.config_src] if task.config_src else [])
    key = input_key(task.src, extra)
    if job.skip_existing and up_to_date(task.dst, job.recipe_sha256, key, task.config_src,
                                        task.config_dst):
        row.status, row.reason = SKIPPED, "up to date (same recipe and input)"
        row.bytes_after = output_bytes(task.dst)
        return
    check_inside(task.dst, task.outdir)
    if isinstance(task.dst, Path):  # object storage has no folders to make
        task.dst.parent.mkdir(parents=True, exist_ok=True)

    last = [0.0]

    def progress(done: int, total: int, what: str) -> None:
        _check_cancel()
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_SECONDS or done >= total:  # a display needs no more
            last[0] = now
            _send(("progress", task.rel, done, total, what))

    report = compress(task.src, task.dst, job.recipe, job.options, progress,
                      metadata={SOURCE_KEY: source_value(job.recipe_sha256, key)},
                      onnx_options=job.onnx_options,
                      safetensors_options=job.safetensors_options,
                      for_loaders=loads_in_transformers(task.config_src))
    if task.config_src is not None and task.config_dst is not None:
        check_inside(task.config_dst, task.outdir)
        write_config(task.config_src, task.config_dst, task.dst)
    if not extra:  # one file in, one file out: the plain sha256 of each, as single runs report
        report.input_sha256 = key
        report.output_sha256 = None if task.kind == "sharded" else file_sha256(task.dst)
    row.status = OK
    row.bytes_after = output_bytes(task.dst)
    row.tensors_changed = len(report.rows)
    errors = [r.error.rel_l2 for r in report.rows]
    row.worst_error = max(errors) if errors else None
    row.report = report.as_dict()
