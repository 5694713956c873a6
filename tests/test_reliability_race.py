"""Issue 15, item 2: two runs writing the same ONNX output with external data.

The commit renames the data file, then the model. Without a lock, a second
run could rename its files in between, leaving one run's model beside the
other's data (both exit 0, the pair does not load). A test hook widens that
window with a random delay; every final pair must load in onnxruntime and be
exactly the files of one of the two runs.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelpress.app.api import compress
from modelpress.core.pipeline import Options
from modelpress.core.recipe import Recipe
from modelpress.formats.onnx import write
from modelpress.formats.onnx.options import OnnxWriteOptions

from conftest import ort_run

RECIPES = {"int8": [{"id": "quantize", "bits": 8}], "int4": [{"id": "quantize", "bits": 4}]}
OPTIONS = Options(threads=1)
WRITER = OnnxWriteOptions(external_data="always")
ITERATIONS = 25


def run(src: Path, dst: Path, name: str) -> None:
    compress(src, dst, Recipe.from_config({"version": 1, "stages": RECIPES[name]}), OPTIONS,
             onnx_options=WRITER)


def files(dst: Path) -> tuple[bytes, bytes]:
    return dst.read_bytes(), (dst.parent / (dst.name + ".data")).read_bytes()


def test_concurrent_writers_leave_one_runs_pair(tmp_path: Path, samples: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = samples / "mlp.onnx"
    expected = {}
    for name in RECIPES:
        (tmp_path / name).mkdir()
        run(src, tmp_path / name / "o.onnx", name)
        expected[name] = files(tmp_path / name / "o.onnx")
    assert expected["int8"] != expected["int4"]
    rng = random.Random(15)
    monkeypatch.setattr(write, "between_renames", lambda: time.sleep(rng.uniform(0, 0.02)))
    x = np.load(samples / "mlp_test_inputs.npz")["input"][:4]
    out = tmp_path / "race" / "o.onnx"
    out.parent.mkdir()
    for _ in range(ITERATIONS):
        errors: list[BaseException] = []

        def writer(name: str) -> None:
            try:
                run(src, out, name)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=writer, args=(n,)) for n in RECIPES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert files(out) in expected.values()
        ort_run(out, {"input": x})
    leftovers = [p.name for p in out.parent.iterdir() if p.name not in ("o.onnx", "o.onnx.data")]
    assert leftovers == []
