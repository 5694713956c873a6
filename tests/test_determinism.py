"""Same input + recipe + version = the same bytes, across runs, processes and --jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from modelpress.cli.main import compress as compress_command
from modelpress import REGISTRY

from conftest import run_cli, sha256

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "int8": ["quantize", "--bits", "8"],
    "int4-g32": ["quantize", "--bits", "4", "--group-size", "32"],
    "int3-asym-mse": ["quantize", "--bits", "3", "--scheme", "asym", "--group-size", "16"],
    "prune-int8": ["prune", "--sparsity", "0.5", "quantize", "--bits", "8"],
    "int4-prune": ["quantize", "--bits", "4", "prune", "--sparsity", "0.3"],
    "prune": ["prune", "--sparsity", "0.6"],
}
for _stage, _args in (("cluster", []), ("cast", []), ("lowrank", ["--rank-ratio", "0.25"])):
    if _stage in REGISTRY:  # issue 3's stages
        RECIPES[_stage] = [_stage, *_args]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("model", ["mlp.onnx", "cnn.safetensors", "transformer.safetensors",
                                   "cnn.onnx"])
def test_repeated_runs_write_identical_bytes(tmp_path: Path, samples: Path, model: str,
                                             recipe: str) -> None:
    suffix = Path(model).suffix
    digests = []
    for i in range(2):
        out = tmp_path / f"run{i}{suffix}"
        result = run_cli(["compress", samples / model, "-o", out, "--min-elements", "1024",
                          *RECIPES[recipe]])
        assert result.exit_code == 0, result.output
        digests.append(sha256(out))
        dense = tmp_path / f"dense{i}{suffix}"
        assert run_cli(["decompress", out, "-o", dense]).exit_code == 0
        digests.append(sha256(dense))
    assert digests[0] == digests[2] and digests[1] == digests[3]


@pytest.mark.parametrize("model", ["transformer.onnx", "transformer.safetensors"])
def test_another_process_with_another_hash_seed_writes_identical_bytes(
        tmp_path: Path, samples: Path, model: str) -> None:
    """Set and dict order must not leak into files: PYTHONHASHSEED differs between runs."""
    suffix = Path(model).suffix
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}{suffix}"
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-m", "modelpress", "compress", str(samples / model),
                               "-o", str(out), "-q", "prune", "--sparsity", "0.5", "quantize",
                               "--bits", "4", "--group-size", "32"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(sha256(out))
    in_process = tmp_path / f"here{suffix}"
    assert run_cli(["compress", samples / model, "-o", in_process, "prune", "--sparsity", "0.5",
                    "quantize", "--bits", "4", "--group-size", "32"]).exit_code == 0
    assert outputs[0] == outputs[1] == sha256(in_process)


@pytest.mark.parametrize("model", ["mlp.onnx", "transformer.safetensors"])
def test_decompressed_low_rank_does_not_depend_on_the_blas_thread_count(
        tmp_path: Path, samples: Path, model: str) -> None:
    """U @ V on two threads rounded differently from one (seen as a flaky decompress)."""
    suffix = Path(model).suffix
    small = tmp_path / f"small{suffix}"
    assert run_cli(["compress", samples / model, "-o", small, "--min-elements", "1024",
                    "lowrank", "--rank-ratio", "0.25"]).exit_code == 0
    digests = []
    for threads in (1, 2):
        dense = tmp_path / f"dense{threads}{suffix}"
        with threadpool_limits(threads, user_api="blas"):
            assert run_cli(["decompress", small, "-o", dense]).exit_code == 0
        digests.append(sha256(dense))
    assert digests[0] == digests[1]


HAS_JOBS = any("--jobs" in getattr(p, "opts", ()) for p in compress_command.params)


@pytest.mark.skipif(not HAS_JOBS, reason="compress has no --jobs option yet (issue 5)")
def test_jobs_do_not_change_the_bytes(tmp_path: Path, samples: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("mlp.onnx", "cnn.onnx", "mlp.safetensors", "cnn.safetensors"):
        shutil.copy(samples / name, models / name)
    trees = []
    for jobs in ("1", "2"):
        out = tmp_path / f"out{jobs}"
        result = run_cli(["compress", models, "-o", out, "--jobs", jobs, "quantize", "--bits", "4"])
        assert result.exit_code == 0, result.output
        trees.append({p.relative_to(out).as_posix(): sha256(p)
                      for p in sorted(out.rglob("*")) if p.is_file()})
    assert len(trees[0]) >= 4 and trees[0] == trees[1]
