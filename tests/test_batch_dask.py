"""Batch mode on a Dask cluster (`--executor dask`): the same outputs, rows and exit codes as
the local pool; a worker killed mid-write has its model retried on another worker.

One `distributed.LocalCluster` of 2 worker processes serves the module; the CLI joins it
with `--scheduler`. One test lets the CLI start its own local cluster.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import run_cli
from tree_helpers import SAMPLES, acceptance_tree, tree_files

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parent.parent
INT4 = ["quantize", "--bits", "4"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, Any]]:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=":0",
                                  resources={"MEMORY": 8e9}) as local, \
            distributed.Client(local) as client:
        yield local, client


def fleet(root: Path) -> Path:
    """12 models: a sharded checkpoint, ONNX (one with external data), safetensors files,
    and one corrupt ONNX file; plus config, tokenizer and README to copy."""
    acceptance_tree(root)                                   # 5 models, broken.onnx among them
    for name in ("mlp", "cnn", "transformer"):
        (root / "weights" / name).mkdir(parents=True)
        shutil.copy(SAMPLES / f"{name}.safetensors", root / "weights" / name / "model.safetensors")
    for i, name in enumerate(("mlp", "cnn", "transformer", "mlp")):
        (root / "more").mkdir(exist_ok=True)
        shutil.copy(SAMPLES / f"{name}.onnx", root / "more" / f"m{i}-{name}.onnx")
    return root


def run(tree: Path, out: Path, *args: object) -> tuple[Any, dict]:
    report = out.parent / f"{out.name}-report.json"
    result = run_cli(["compress", tree, "-o", out, "--report", report, *args, *INT4])
    return result, json.loads(report.read_text()) if report.exists() else {}


def rows(report: dict) -> dict[str, tuple]:
    return {m["path"]: (m["status"], m["bytes_after"], m["worst_rel_error"])
            for m in report["models"]}


def test_a_fleet_on_the_cluster_matches_the_local_pool(cluster: tuple, tmp_path: Path) -> None:
    tree = fleet(tmp_path / "in")
    local, _ = cluster
    reference, expected = run(tree, tmp_path / "ref", "--jobs", "1")
    assert reference.exit_code == 1 and len(expected["models"]) == 12

    result, report = run(tree, tmp_path / "out", "--executor", "dask",
                         "--scheduler", local.scheduler_address)
    assert result.exit_code == 1, result.output
    assert "failed: vision/broken.onnx: not a valid ONNX model" in result.output
    assert "1 of 12 models failed (the others were written)" in result.output
    assert rows(report) == rows(expected)
    assert report["jobs"] == 2 and report["totals"] == expected["totals"]
    assert tree_files(tmp_path / "out") == tree_files(tmp_path / "ref")
    assert list((tmp_path / "out").rglob(".*")) == []

    # --skip-existing: every good model is up to date; the corrupt one fails again.
    again, report = run(tree, tmp_path / "out", "--executor", "dask",
                        "--scheduler", local.scheduler_address, "--skip-existing")
    assert again.exit_code == 1
    assert {p: s for p, (s, _, _) in rows(report).items()} == {
        **{p: "skipped" for p in rows(expected) if p != "vision/broken.onnx"},
        "vision/broken.onnx": "failed"}

    # --shard K/N takes the same slice as the local pool.
    _, local_half = run(tree, tmp_path / "half-local", "--jobs", "1", "--shard", "2/3")
    _, dask_half = run(tree, tmp_path / "half-dask", "--executor", "dask",
                       "--scheduler", local.scheduler_address, "--shard", "2/3")
    assert rows(dask_half) == rows(local_half) and len(rows(dask_half)) == 4
    assert tree_files(tmp_path / "half-dask") == tree_files(tmp_path / "half-local")


def test_fail_fast_stops_the_models_not_yet_done(cluster: tuple, tmp_path: Path) -> None:
    local, client = cluster
    # Workers already warm (a cold one takes seconds to import modelpress, long enough for
    # the other to finish several small models before the failure is known).
    client.run(importlib.import_module, "modelpress.app.api")
    tree = fleet(tmp_path / "in")
    # The largest model runs first: make the corrupt one the largest.
    (tree / "vision" / "broken.onnx").write_bytes(os.urandom(2_000_000))
    out = tmp_path / "out"
    result, report = run(tree, out, "--executor", "dask", "--scheduler",
                         local.scheduler_address, "--fail-fast")
    assert result.exit_code == 1
    status = {p: s for p, (s, _, _) in rows(report).items()}
    assert status.pop("vision/broken.onnx") == "failed"
    # The failed task stops the run from its worker; the other worker may finish the model
    # it had begun (or, on a loaded machine, one more); every later one is not run.
    assert list(status.values()).count("skipped") >= 9
    assert all(m["reason"].startswith("not finished: the run was stopped")
               for m in report["models"] if m["status"] == "skipped")
    written = {p for p in tree_files(out) if p.endswith((".onnx", ".safetensors", "index.json"))}
    assert {p for p, s in status.items() if s == "ok"} == {p for p in written
                                                           if not p.startswith("llm/model-")}
    assert list(out.rglob(".*")) == []


def test_a_worker_killed_mid_write_has_its_model_retried(cluster: tuple, tmp_path: Path) -> None:
    local, client = cluster
    tree = tmp_path / "in"
    for folder, name in (("held", "transformer.safetensors"), ("a", "mlp.onnx"),
                         ("b", "cnn.safetensors")):
        (tree / folder).mkdir(parents=True)
        shutil.copy(SAMPLES / name, tree / folder / name)
    assert run(tree, tmp_path / "ref", "--jobs", "1")[0].exit_code == 0
    workers = {w["pid"] for w in client.run(lambda: {"pid": os.getpid()}).values()}

    hold = tmp_path / "hold"
    hold.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "MODELPRESS_TEST_HOLD_WRITE": str(hold)}
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", "compress", str(tree), "-o",
                             str(out), "--executor", "dask", "--scheduler",
                             local.scheduler_address, "--quiet", *INT4], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (hold / "held").exists() or not (hold / "held").read_text():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no worker was caught writing"
            time.sleep(0.02)
        # The other worker finishes the two small models first, so it is idle at the kill.
        while not ((out / "a" / "mlp.onnx").exists() and (out / "b" / "cnn.safetensors").exists()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        pid, rel = (hold / "held").read_text().split(" ", 1)
        assert rel == "held/transformer.safetensors" and int(pid) in workers
        assert list((out / "held").glob(".transformer.safetensors.*.modelpress-tmp"))
        os.kill(int(pid), signal.SIGKILL)                  # mid-write: its temporary file is open
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert tree_files(out) == tree_files(tmp_path / "ref")  # nothing partial at an output name
    # The scheduler's event log shows the model taken by the killed worker, then another one.
    taken = [msg[2] for events in client.get_events().values() for _, msg in events
             if isinstance(msg, (list, tuple)) and tuple(msg[:2]) == ("taken", rel)]
    assert taken[0] == int(pid) and len(taken) == 2 and taken[1] in workers - {int(pid)}


def test_without_a_scheduler_it_starts_a_local_cluster(tmp_path: Path) -> None:
    tree = tmp_path / "in"
    (tree / "x").mkdir(parents=True)
    shutil.copy(SAMPLES / "mlp.onnx", tree / "x" / "mlp.onnx")
    shutil.copy(SAMPLES / "mlp.safetensors", tree / "mlp.safetensors")
    reference, _ = run(tree, tmp_path / "ref", "--jobs", "1")
    result, report = run(tree, tmp_path / "out", "--executor", "dask", "--jobs", "2")
    assert result.exit_code == reference.exit_code == 0, result.output
    assert report["jobs"] == 2 and "a local Dask cluster: 2 workers" in report["notes"][0]
    assert tree_files(tmp_path / "out") == tree_files(tmp_path / "ref")


def test_usage_and_connection_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "in"
    tree.mkdir()
    shutil.copy(SAMPLES / "mlp.onnx", tree / "mlp.onnx")
    result = run_cli(["compress", tree, "-o", tmp_path / "out", "--scheduler", "tcp://x:1", *INT4])
    assert result.exit_code == 2 and "--scheduler applies to --executor dask" in result.output
    result = run_cli(["compress", SAMPLES / "mlp.onnx", "-o", tmp_path / "m.onnx",
                      "--executor", "dask", *INT4])
    assert result.exit_code == 2 and "--executor applies to batch mode" in result.output
    # --dry-run needs no cluster: it reads headers here.
    result = run_cli(["compress", tree, "-o", tmp_path / "out", "--executor", "dask",
                      "--scheduler", "tcp://127.0.0.1:1", "--dry-run", *INT4])
    assert result.exit_code == 0 and "est." in result.output
    from modelpress.app.batch import cluster as module
    monkeypatch.setattr(module, "_CONNECT_SECONDS", 1)
    result = run_cli(["compress", tree, "-o", tmp_path / "out", "--executor", "dask",
                      "--scheduler", "tcp://127.0.0.1:1", *INT4])
    assert result.exit_code == 1, result.output
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in result.output
    assert not (tmp_path / "out").exists()



def test_tasks_ask_for_their_memory_need_as_the_memory_resource(tmp_path: Path) -> None:
    from modelpress.app.batch.cluster import RESOURCE, task_resources
    from modelpress.app.batch.plan import memory_need
    from modelpress.app.batch.worker import Task
    tasks = [Task(rel=f"m{i}.onnx", kind="onnx", src=tmp_path / f"m{i}.onnx",
                  dst=tmp_path / "out" / f"m{i}.onnx", outdir=tmp_path / "out", nbytes=size)
             for i, size in enumerate((10**6, 10**9))]
    small, big = memory_need(tasks[0]), memory_need(tasks[1])     # 0.27 GB and 10.3 GB
    needs, notes = task_resources(tasks, [{"nthreads": 2, "resources": {RESOURCE: 16e9}},
                                          {"nthreads": 4, "resources": {RESOURCE: 8e9}}])
    assert needs == {"m0.onnx": {RESOURCE: small}, "m1.onnx": {RESOURCE: big}} and notes == []
    # A model above every worker's MEMORY runs alone on the largest one instead of never.
    needs, notes = task_resources(tasks, [{"nthreads": 2, "resources": {RESOURCE: 4e9}}])
    assert needs == {"m0.onnx": {RESOURCE: small}, "m1.onnx": {RESOURCE: 4e9}}
    assert notes == ["1 of 2 models need more than the largest worker's MEMORY (4.00 GB) by "
                     "the estimate; each of them runs alone on such a worker"]
    # Workers without the resource: no request (a task asking for it would never run).
    needs, notes = task_resources(tasks, [{"nthreads": 2, "resources": {}}])
    assert needs == {} and "declare no MEMORY resource" in notes[0]
