"""A wheel built from the repo installs one package, `modelpress`, that works next to a
user's own `cli.py`, `formats.py` and `compress_core.py` (issue 14).

Slow (a wheel build and a fresh venv, about a minute on a busy 2-core machine), but
CI runs it: the package-dir mapping is easy to break in ways an editable install
never shows.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from import_tree import REPO

pytestmark = pytest.mark.slow

SAMPLE = REPO / "sample_models" / "mlp.onnx"
# Names of the card's folders, and so the names a wrong install would put at the top level.
DECOYS = ("cli", "formats", "compress_core")
# What `modelpress compress` of an ONNX file may import; onnxruntime is optional.
DEPENDENCIES = ("click", "numpy", "safetensors", "onnx", "rich", "ml_dtypes", "yaml",
                "threadpoolctl", "onnxruntime")


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_wheel(dest: Path) -> Path:
    """A wheel from a copy of the checkout, so that no stale build/ folder leaks into it."""
    source = dest / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", ".import_linter_cache"))
    wheels = dest / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        cwd=dest, env=dict(os.environ))
    (wheel,) = wheels.glob("modelpress-*.whl")
    return wheel


def dependency_dirs() -> list[str]:
    """sys.path entries of this process that hold modelpress's dependencies, outside the base
    interpreter's (which a --system-site-packages venv sees anyway)."""
    entries = [Path(p).resolve() for p in sys.path if p]
    dirs = set()
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin).resolve()
        holder = next((e for e in entries if e in origin.parents), None)
        if holder is not None and Path(sys.base_prefix).resolve() not in [holder, *holder.parents]:
            dirs.add(str(holder))
    return sorted(dirs)


def fresh_venv(dest: Path) -> Path:
    """A venv without pip (pip runs from this process, on `--python`) that sees the
    dependencies already installed but not this checkout's editable modelpress."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(dest)
    python = dest / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  cwd=dest, env={"PATH": os.environ["PATH"]}).strip()
    # Dependencies installed in a venv (as CI's `pip install -e .[dev]` may do) rather than in
    # the base interpreter. A plain path line runs no .pth file of that folder, so its editable
    # modelpress finder is not installed.
    extra = dependency_dirs()
    if extra:
        Path(purelib, "outer_dependencies.pth").write_text("".join(f"{d}\n" for d in extra))
    return python


def test_wheel_installs_one_package_that_ignores_lookalike_modules(tmp_path):
    wheel = build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    python = fresh_venv(env_dir)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    # --ignore-installed: the venv sees the checkout's editable modelpress (CI installs it in the
    # base interpreter), which pip would otherwise take as this wheel already installed.
    run([*pip, "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
        cwd=tmp_path, env=dict(os.environ))

    work = tmp_path / "project"
    work.mkdir()
    for name in DECOYS:
        (work / f"{name}.py").write_text(f"raise RuntimeError('the project\\'s own {name}.py was imported')\n")
    shutil.copy(SAMPLE, work / "mlp.onnx")
    # The project's folder is first on sys.path for every command, as `python -m`, `python -c`
    # and PYTHONPATH=. put it for a user; the console script would not look there otherwise.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", PYTHONPATH=str(work), NO_COLOR="1")

    run([str(env_dir / "bin" / "modelpress"), "compress", "mlp.onnx", "-o", "m.onnx", "quantize", "--bits", "8"],
        cwd=work, env=env)
    assert 0 < (work / "m.onnx").stat().st_size < (work / "mlp.onnx").stat().st_size

    version = run([str(python), "-m", "modelpress", "--version"], cwd=work, env=env)
    assert re.search(r"\d+\.\d+", version), version

    api = run([str(python), "-c", (
        "import sys, modelpress\n"
        "r = modelpress.compress('mlp.onnx', 'api.onnx', modelpress.Recipe([modelpress.Quantize(bits=8)]))\n"
        "assert r.ratio < 1, r.ratio\n"
        "print('\\n'.join(m.__file__ for n, m in sorted(sys.modules.items())\n"
        "                 if n.split('.')[0] == 'modelpress' and getattr(m, '__file__', None)))\n")],
        cwd=work, env=env)
    files = api.split()
    assert any(f.endswith(os.path.join("modelpress", "core", "pipeline.py")) for f in files), api
    assert all(Path(f).resolve().is_relative_to(env_dir.resolve()) for f in files), api
    assert 0 < (work / "api.onnx").stat().st_size < (work / "mlp.onnx").stat().st_size

    shown = run([*pip, "show", "-f", "modelpress"], cwd=tmp_path, env=dict(os.environ))
    location = re.search(r"^Location: (.+)$", shown, re.M).group(1)
    assert Path(location).resolve().is_relative_to(env_dir.resolve()), shown
    listed = shown.split("Files:", 1)[1].split()
    top_level = {Path(f).parts[0] for f in listed if not f.startswith("..")}
    top_level = {name for name in top_level if not name.endswith(".dist-info")}
    assert top_level == {"modelpress"}, shown
