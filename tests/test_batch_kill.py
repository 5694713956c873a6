"""A batch run killed with SIGKILL leaves no partial file at any output name; a re-run completes.

What this proves: the run (one job, or two jobs once a worker process is
running) is killed while it is writing an output (a temporary file exists)
after at least one output is complete; every file then present at an output name is byte-identical to
the one a clean run writes, worker processes end with their parent, and
`--skip-existing` then completes the tree to exactly the clean run's files.
The kill lands somewhere in a write (the test polls the folder), not at a
chosen byte.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from tree_helpers import SAMPLES, acceptance_tree, tree_files

ROOT = Path(__file__).resolve().parent.parent
MODEL_SUFFIXES = (".onnx", ".safetensors", ".json")


def _writing(out: Path) -> bool:
    """True once a first output exists and another is being written (a temporary file)."""
    names = [p.name for p in out.rglob("*")] if out.exists() else []
    return any(n.endswith(".modelpress-tmp") for n in names) and any(
        n.endswith((".onnx", ".safetensors")) and not n.startswith(".") for n in names)


def _descendants(pid: int) -> set[int]:
    """Children, grandchildren ..."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
        for child in children - found:
            found |= {child} | _descendants(child)
    return found


def _workers(pid: int) -> int:
    """Worker processes below `pid` that are up: started by multiprocessing's spawn and
    running their watchdog thread (started once the worker has imported modelpress)."""
    return sum("spawn_main" in _cmdline(p) and _threads(p) >= 2 for p in _descendants(pid))


def _threads(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next((line.split()[1] for line in status.splitlines()
                     if line.startswith("Threads:")), 0))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigkill_half_way_then_rerun_completes(tmp_path: Path, jobs: str) -> None:
    tree = acceptance_tree(tmp_path / "in", corrupt=False)
    (tree / "many").mkdir()
    for i in range(32):  # enough work that the run is still going when a worker is up
        shutil.copy(SAMPLES / "transformer.onnx", tree / "many" / f"t{i:02d}.onnx")
    stages = ["quantize", "--bits", "4"]
    reference = tmp_path / "reference"
    assert run_cli(["compress", tree, "-o", reference, "--jobs", "1", *stages]).exit_code == 0
    expected = tree_files(reference)

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", "compress", str(tree), "-o", str(out),
                             "--jobs", jobs, "--quiet", *stages], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _writing(out) or (jobs == "2" and _workers(proc.pid) < 1):
            assert proc.poll() is None, "the run ended before it was caught writing"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        workers = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "worker processes outlived their parent"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    present = tree_files(out)
    models = [k for k in expected if k.endswith((".onnx", "index.json"))]
    leftovers = [p.name for p in out.rglob(".*modelpress-tmp")]
    print(f"jobs {jobs}: killed with {len([k for k in models if k in present])} of "
          f"{len(models)} model outputs present and {len(leftovers)} temporary files left")
    assert 0 < len([k for k in models if k in present]) < len(models), "not killed half-way"
    for name, data in present.items():
        assert data == expected[name], f"{name} is not the complete output"

    rerun = run_cli(["compress", tree, "-o", out, "--jobs", "1", "--skip-existing", *stages])
    assert rerun.exit_code == 0, rerun.output
    assert tree_files(out) == expected
