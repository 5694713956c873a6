"""Batch mode: a tree of models in one command, resumable, shardable, parallel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors import safe_open

from modelpress import decompress
from modelpress.formats import open_model

from conftest import ort_run, run_cli, sha256
from tree_helpers import SAMPLES, acceptance_tree, sample_tensors, tree_files

ROOT = Path(__file__).resolve().parent.parent
GOOD = ["llm/model.safetensors.index.json", "text/transformer.onnx", "vision/cnn.onnx",
        "vision/mlp.onnx"]
ALL = sorted(GOOD + ["vision/broken.onnx"])
INT4 = ["quantize", "--bits", "4"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return acceptance_tree(tmp_path / "in")


def batch(tree: Path, out: Path, *args: object, stages: list[str] = INT4) -> tuple[object, dict]:
    report = out.parent / f"{out.name}-report.json"
    result = run_cli(["compress", tree, "-o", out, "--report", report, *args, *stages])
    return result, json.loads(report.read_text()) if report.exists() else {}


def statuses(report: dict) -> dict[str, str]:
    return {m["path"]: m["status"] for m in report["models"]}


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in root.rglob("*") if p.is_file()}


def test_one_command_compresses_copies_and_reports_the_corrupt_file(tree: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    result, report = batch(tree, out, "--jobs", "1")
    assert result.exit_code == 1, result.output
    assert "failed: vision/broken.onnx:" in result.output
    assert "vision/broken.onnx: not a valid ONNX model" in result.output
    assert "1 of 5 models failed (the others were written)" in result.output
    assert statuses(report) == {**{p: "ok" for p in GOOD}, "vision/broken.onnx": "failed"}
    assert sorted(tree_files(out)) == sorted(
        GOOD + ["README.md", "llm/config.json", "llm/tokenizer.json"]
        + [f"llm/model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)])
    assert list(out.rglob(".*")) == []                       # no temporary files left
    for name in ("README.md", "llm/tokenizer.json"):
        assert (out / name).read_bytes() == (tree / name).read_bytes()
    # Each good model's row carries its own full report, whose sizes are the files on disk.
    for row in report["models"]:
        if row["status"] == "ok":
            assert row["report"]["totals"]["file_bytes_after"] == row["bytes_after"]
            assert row["ratio"] < 0.3 and row["worst_rel_error"] < 0.2
    mlp = next(m["report"] for m in report["models"] if m["path"] == "vision/mlp.onnx")
    assert mlp["input_sha256"] == sha256(tree / "vision" / "mlp.onnx")
    assert mlp["output_sha256"] == sha256(out / "vision" / "mlp.onnx")
    assert report["totals"]["ok"] == 4 and report["totals"]["failed"] == 1
    assert report["totals"]["bytes_after"] == sum(
        p.stat().st_size for p in out.rglob("*") if p.is_file() and p.suffix in
        (".onnx", ".safetensors", ".json") and p.name not in ("config.json", "tokenizer.json"))


def test_onnx_outputs_run_and_external_data_is_inlined(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    batch(tree, out, "--jobs", "1")
    assert not (out / "text" / "transformer.onnx.data").exists()
    model = onnx.load(str(out / "text" / "transformer.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    ids = np.arange(32, dtype=np.int64).reshape(2, 16)
    for rel, feeds in (("text/transformer.onnx", {"input_ids": ids}),
                       ("vision/mlp.onnx", {"input": np.load(SAMPLES / "mlp_test_inputs.npz")
                                            ["input"][:64]})):
        onnx.checker.check_model(str(out / rel), full_check=True)
        ref = ort_run(tree / rel, feeds, exact=True)[0]
        got = ort_run(out / rel, feeds, exact=True)[0]
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.25


def test_sharded_output_loads_through_its_index(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, report = batch(tree, out, "--jobs", "1")
    index = out / "llm" / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    stored = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(index.parent / shard), framework="np") as f:
            stored.update({key: shard for key in f.keys()})
            assert "modelpress" in f.metadata()
    assert weight_map == stored
    assert any(k.endswith(".weight_packed") for k in stored)
    config = json.loads((out / "llm" / "config.json").read_text())
    assert config["model_type"] == "toy"
    block = config["quantization_config"]
    assert block["format"] == "pack-quantized"
    weights = block["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (4, "group", 128)
    (tmp_path / "dense").mkdir()
    decompress(index, tmp_path / "dense" / index.name)
    restored = open_model(tmp_path / "dense")
    row = next(m for m in report["models"] if m["path"] == GOOD[0])
    errors = {t["name"]: t["rel_error"] for t in row["report"]["tensors"]}
    for name, array in sample_tensors().items():
        back = restored.read(name)
        assert back.shape == array.shape and back.dtype == array.dtype
        if name in errors:
            rel = np.linalg.norm(back - array) / np.linalg.norm(array)
            assert rel == pytest.approx(errors[name], rel=1e-5)
        else:
            np.testing.assert_array_equal(back, array)


def test_skip_existing_does_no_work_and_notices_changes(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    batch(tree, out, "--jobs", "1")
    before = stamps(out)
    result, report = batch(tree, out, "--jobs", "1", "--skip-existing")
    assert result.exit_code == 1                       # the corrupt file still fails
    assert statuses(report) == {**{p: "skipped" for p in GOOD}, "vision/broken.onnx": "failed"}
    assert all(m["reason"] == "up to date (same recipe and input)" for m in report["models"]
               if m["status"] == "skipped")
    assert {c["status"] for c in report["copied"]} == {"skipped"}
    assert stamps(out) == before                       # not a byte rewritten, not a file replaced
    # Same bytes with a new mtime is the same input; a changed input or a lost shard is not.
    os.utime(tree / "vision" / "cnn.onnx", ns=(1, 1))
    shutil.copy(SAMPLES / "transformer.onnx", tree / "vision" / "mlp.onnx")
    (out / "llm" / "model-00002-of-00003.safetensors").unlink()
    _, report = batch(tree, out, "--jobs", "1", "--skip-existing")
    assert statuses(report) == {"llm/model.safetensors.index.json": "ok",
                                "text/transformer.onnx": "skipped", "vision/cnn.onnx": "skipped",
                                "vision/mlp.onnx": "ok", "vision/broken.onnx": "failed"}
    # Another recipe redoes everything.
    _, report = batch(tree, out, "--jobs", "1", "--skip-existing", stages=["quantize"])
    assert statuses(report) == {**{p: "ok" for p in GOOD}, "vision/broken.onnx": "failed"}


def test_shards_cover_every_model_exactly_once(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[str] = []
    copied: list[str] = []
    for k in (1, 2):
        result, report = batch(tree, out, "--jobs", "1", "--shard", f"{k}/2")
        assert report["shard"] == f"{k}/2"
        seen += [m["path"] for m in report["models"]]
        copied += [c["path"] for c in report["copied"]]
    assert sorted(seen) == ALL
    assert sorted(copied) == ["README.md", "llm/tokenizer.json"]
    assert sorted(tree_files(out)) == sorted(tree_files(tmp_path / "out")) and \
        (out / "llm" / "config.json").exists()


def test_jobs_1_and_2_write_identical_bytes(tmp_path: Path) -> None:
    tree = acceptance_tree(tmp_path / "in", corrupt=False)
    first, _ = batch(tree, tmp_path / "one", "--jobs", "1")
    assert first.exit_code == 0
    # A real process: worker processes' stray output (a traceback) would show on its stderr.
    second = subprocess.run([sys.executable, "-m", "modelpress", "compress", str(tree), "-o",
                             str(tmp_path / "two"), "--jobs", "2", "--quiet", "--report",
                             str(tmp_path / "two.json"), *INT4], cwd=ROOT, capture_output=True,
                            text=True)
    assert second.returncode == 0 and second.stdout == "" and second.stderr == "", second.stderr
    assert json.loads((tmp_path / "two.json").read_text())["jobs"] == 2
    one = tree_files(tmp_path / "one")
    assert len(one) == 10 and one == tree_files(tmp_path / "two")
    # The same with every model compressed in worker processes (the CLI starts workers
    # only when a batch lasts long enough to repay their start-up).
    from modelpress import Quantize, Recipe
    from modelpress.app.batch.plan import BatchOptions, plan_batch, run_batch
    events: list[tuple] = []
    result = run_batch(plan_batch([tree], tmp_path / "three"), Recipe([Quantize(bits=4)]),
                       batch=BatchOptions(jobs=2, start_delay=0, run_here=False),
                       on_event=events.append)
    assert {m.status for m in result.models} == {"ok"}
    pids = {e[2] for e in events if e[0] == "taken"}
    assert pids and os.getpid() not in pids
    assert tree_files(tmp_path / "three") == one


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_fail_fast_stops_at_the_first_failure(tree: Path, tmp_path: Path, jobs: str) -> None:
    # The largest model runs first: make the corrupt one the largest.
    (tree / "vision" / "broken.onnx").write_bytes(os.urandom(2_000_000))
    out = tmp_path / "out"
    result, report = batch(tree, out, "--jobs", jobs, "--fail-fast")
    assert result.exit_code == 1
    assert statuses(report) == {**{p: "skipped" for p in GOOD}, "vision/broken.onnx": "failed"}
    assert all(m["reason"].startswith("not finished: the run was stopped")
               for m in report["models"] if m["status"] == "skipped")
    assert not any(p.suffix in (".onnx", ".safetensors") for p in out.rglob("*"))
    assert list(out.rglob(".*")) == []


def test_dry_run_writes_nothing_and_estimates_sizes(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(["compress", tree, "-o", out, "--dry-run", "--format", "json", *INT4])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    rows = {r["path"]: r for r in json.loads(result.stdout)}
    assert {rows[p]["action"] for p in GOOD} == {"compress"}
    assert rows["vision/broken.onnx"]["action"] == "fail"
    assert rows["README.md"]["action"] == "copy"
    table = run_cli(["compress", tree, "-o", out, "--dry-run", *INT4])
    assert "est." in table.stdout and "estimate" in table.stdout
    _, report = batch(tree, out, "--jobs", "1")
    for row in report["models"]:
        if row["status"] == "ok":   # headers-only estimate within 25% of the real size
            assert rows[row["path"]]["bytes_after"] == pytest.approx(row["bytes_after"], rel=0.25)
    again = run_cli(["compress", tree, "-o", out, "--dry-run", "--skip-existing", "--format",
                     "json", *INT4])
    assert {r["path"]: r["action"] for r in json.loads(again.stdout)
            if r["path"] in GOOD} == {p: "skip" for p in GOOD}


def test_links_are_refused_and_the_rest_completes(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(SAMPLES / "mlp.onnx", outside / "m.onnx")
    (tree / "link.onnx").symlink_to(outside / "m.onnx")
    (tree / "linked_dir").symlink_to(outside)
    (tree / "vision" / "broken.onnx").unlink()
    out = tmp_path / "out"
    result, report = batch(tree, out, "--jobs", "1")
    assert result.exit_code == 1
    assert "refused: link.onnx: symbolic link; modelpress does not follow links" in result.output
    assert "refused: linked_dir: symbolic link to a folder" in result.output
    assert statuses(report) == {p: "ok" for p in GOOD}
    assert not (out / "link.onnx").exists() and not (out / "linked_dir").exists()


def test_writing_outside_the_output_folder_through_a_link_is_refused(tree: Path,
                                                                     tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "vision").symlink_to(elsewhere)
    result, report = batch(tree, out, "--jobs", "1")
    assert result.exit_code == 1
    assert "vision/mlp.onnx: would be written outside the output folder" in result.output
    assert list(elsewhere.iterdir()) == []
    assert statuses(report)["text/transformer.onnx"] == "ok"


def test_output_folder_inside_the_input_is_not_read(tree: Path) -> None:
    out = tree / "compressed"
    first, report = batch(tree, out, "--jobs", "1")
    assert len(report["models"]) == 5
    again, report = batch(tree, out, "--jobs", "1", "--skip-existing")
    assert len(report["models"]) == 5 and not any(
        m["path"].startswith("compressed") for m in report["models"])
    result = run_cli(["compress", tree, "-o", tree, *INT4])
    assert result.exit_code == 1 and "the output folder is the input folder" in result.output


def test_several_inputs_mirror_their_common_folder(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "mlp.onnx", tmp_path / "a.onnx")
    shutil.copy(SAMPLES / "cnn.safetensors", tmp_path / "b.safetensors")
    out = tmp_path / "out"
    result = run_cli(["compress", tmp_path / "a.onnx", tmp_path / "b.safetensors", "-o", out,
                      "--jobs", "1", "--format", "markdown", "quantize"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "b.safetensors"]
    assert "| `a.onnx` | ok |" in result.stdout and "| **total: 2 models" in result.stdout
    # A single file with an existing folder as -o is a batch of one.
    result = run_cli(["compress", tmp_path / "a.onnx", "-o", out, "--skip-existing", "quantize"])
    assert result.exit_code == 0 and "skipped" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--jobs", "2"], "--jobs applies to batch mode"),
    (["--shard", "1/2"], "--shard applies to batch mode"),
    (["--shard", "3/2"], "Invalid value for '--shard': '3/2': K must be between 1 and N"),
    (["--shard", "x"], "Invalid value for '--shard': 'x' is not K/N"),
    (["--jobs", "0"], "Invalid value for '-j' / '--jobs'"),
    (["--max-shard-size", "5XB"], "Invalid value for '--max-shard-size'"),
])
def test_batch_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli(["compress", SAMPLES / "mlp.onnx", "-o", tmp_path / "o.onnx", *args,
                      "quantize"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_default_jobs_follow_cpus_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelpress.app.batch import plan as batch
    from modelpress.app.batch.worker import Task

    def tasks(kind: str, nbytes: int, count: int = 10) -> list[Task]:
        return [Task(f"m{i}", kind, Path("in"), Path("out"), Path("."), nbytes=nbytes)
                for i in range(count)]
    monkeypatch.setattr(batch, "default_threads", lambda: 8)
    monkeypatch.setattr(batch, "available_memory", lambda: 4 * 2**30)
    # ONNX: 256 MiB + 10 x 200 MB = 2.27 GB per job -> one job fits in 4 GiB.
    assert batch.default_jobs(tasks("onnx", 200_000_000)) == 1
    # safetensors: 256 MiB + 2 x 200 MB = 0.67 GB per job -> six jobs fit.
    assert batch.default_jobs(tasks("safetensors", 200_000_000)) == 6
    assert batch.default_jobs(tasks("safetensors", 1000, count=3)) == 3   # one job per model
    monkeypatch.setattr(batch, "available_memory", lambda: None)
    assert batch.default_jobs(tasks("onnx", 10**12)) == 8                 # no memory figure
    monkeypatch.setattr(batch, "available_memory", lambda: 0)
    assert batch.default_jobs(tasks("onnx", 10**9)) == 1                  # never below one


def test_progress_display_tracks_running_jobs() -> None:
    import io

    from rich.console import Console

    from modelpress.cli.batch import BatchProgress
    display = BatchProgress(Console(file=io.StringIO(), force_terminal=True, width=100))
    display(("plan", 2, 3))
    display(("start", "a.onnx", 10))
    display(("start", "b/c.safetensors", 10))
    display(("progress", "a.onnx", 1, 4, "fc1.weight"))
    assert set(display.running) == {"a.onnx", "b/c.safetensors"}
    job = display.bar.tasks[1]
    assert (job.completed, job.total) == (1, 4) and "fc1.weight" in job.description
    display(("done", "a.onnx", "ok"))
    display(("model", None))
    display(("copy", None))
    assert set(display.running) == {"b/c.safetensors"}
    overall = display.bar.tasks[0]
    assert (overall.completed, overall.total) == (1, 2)
    assert overall.description == "models (files copied 1/3)"


def test_named_checkpoint_and_onnx_files_bring_their_parts(tree: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file
    out = tmp_path / "out"
    args = [tree / "text" / "transformer.onnx", tree / "llm" / "model.safetensors.index.json",
            "-o", out, "--jobs", "1", "--report", tmp_path / "r.json", "quantize"]
    assert run_cli(["compress", *args]).exit_code == 0
    assert sorted(tree_files(out)) == ["llm/model-00001-of-00003.safetensors",
                                       "llm/model-00002-of-00003.safetensors",
                                       "llm/model-00003-of-00003.safetensors",
                                       "llm/model.safetensors.index.json",
                                       "text/transformer.onnx"]
    # The shards and the external data are part of each model's input key.
    shard = tree / "llm" / "model-00002-of-00003.safetensors"
    with safe_open(str(shard), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    data = tree / "text" / "transformer.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    assert run_cli(["compress", *args[:-1], "--skip-existing", "quantize"]).exit_code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert statuses(report) == {"llm/model.safetensors.index.json": "ok",
                                "text/transformer.onnx": "ok"}


def test_a_linked_shard_blocks_its_checkpoint(tree: Path, tmp_path: Path) -> None:
    shard = tree / "llm" / "model-00003-of-00003.safetensors"
    moved = tmp_path / "elsewhere.safetensors"
    shard.rename(moved)
    shard.symlink_to(moved)
    out = tmp_path / "out"
    result, report = batch(tree, out, "--jobs", "1")
    row = next(m for m in report["models"] if m["path"] == GOOD[0])
    assert row["status"] == "failed"
    assert row["reason"] == ("shard model-00003-of-00003.safetensors is a symbolic link; "
                             "modelpress does not follow links inside a tree (copy the target in)")
    assert not (out / "llm" / "model.safetensors.index.json").exists()
    assert statuses(report)["vision/mlp.onnx"] == "ok"


@pytest.mark.parametrize("args, message", [
    (["--max-error", "0.1"], "--max-error applies to one model at a time; batch mode reports "
                             "weight errors and does not run the models"),
    (["--labels", "y.npy"], "--labels applies to one model at a time"),
])
def test_model_runs_and_thresholds_are_refused_in_batch_mode(tmp_path: Path, args: list[str],
                                                            message: str) -> None:
    result = run_cli(["compress", SAMPLES / "mlp.onnx", "-o", tmp_path, *args, "quantize"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []
    ok = run_cli(["compress", SAMPLES / "mlp.onnx", "-o", tmp_path, "--no-eval", "quantize"])
    assert ok.exit_code == 0 and (tmp_path / "mlp.onnx").exists()


@pytest.mark.parametrize("stages", [["cast", "--dtype", "fp8-e4m3"], ["cluster", "--bits", "4"],
                                    ["lowrank", "--rank-ratio", "0.25"]])
def test_dry_run_estimates_other_stages(tree: Path, tmp_path: Path, stages: list[str]) -> None:
    (tree / "vision" / "broken.onnx").unlink()
    out = tmp_path / "out"
    dry = run_cli(["compress", tree, "-o", out, "--dry-run", "--format", "json", *stages])
    estimates = {r["path"]: r for r in json.loads(dry.stdout)}
    _, report = batch(tree, out, "--jobs", "1", stages=stages)
    for row in report["models"]:
        assert row["status"] == "ok"
        assert estimates[row["path"]]["bytes_after"] == pytest.approx(row["bytes_after"],
                                                                      rel=0.25)
        assert "no size rule" not in estimates[row["path"]]["note"]


def test_a_killed_worker_fails_its_model_and_the_run_still_ends(tmp_path: Path) -> None:
    import signal

    from modelpress import Quantize, Recipe
    from modelpress.app.batch.plan import BatchOptions, plan_batch, run_batch
    tree = acceptance_tree(tmp_path / "in", corrupt=False)
    killed: set[int] = set()

    def kill_workers(event: tuple) -> None:  # as an out-of-memory kill would
        if event[0] == "taken" and event[2] != os.getpid() and event[2] not in killed:
            killed.add(event[2])
            os.kill(event[2], signal.SIGKILL)
    result = run_batch(plan_batch([tree], tmp_path / "out"), Recipe([Quantize(bits=4)]),
                       batch=BatchOptions(jobs=2, start_delay=0, run_here=False),
                       on_event=kill_workers)
    # A worker killed just after sending its result still has its model done.
    failed = [m for m in result.models if m.status == "failed"]
    assert killed and failed and {m.status for m in result.models} <= {"ok", "failed"}
    reasons = {m.reason.split(" (")[0] for m in failed}
    assert reasons <= {"worker process ended unexpectedly",
                       "not compressed: every worker process ended unexpectedly"}
    for row in result.models:   # nothing at the output name of a model that failed
        assert Path(row.output).exists() == (row.status == "ok")
