"""Every bad-input corpus entry through compress (every recipe), inspect and decompress.

For each run: exit 0 with an output that reads back correctly, or exit 1 with
exactly one line that names the input file (and the text the entry expects);
never a traceback, never a file left in the output folder after a failure,
never a temporary file, never a changed input byte, never a loaded pickle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import Result

from modelpress.app.api import decompress
from modelpress.core.registry import REGISTRY
from modelpress.formats import open_model

from conftest import run_cli
from corpus import Entry, build_corpus, marker_path, names

INDEX_SUFFIX = ".safetensors.index.json"
RECIPES: dict[str, list[str]] = {
    "int8": ["quantize", "--bits", "8"],
    "int4": ["quantize", "--bits", "4", "--group-size", "16"],
    "prune": ["prune", "--sparsity", "0.5"],
}
# Issue 3's stages (default options; lowrank needs a target rank).
for _stage, _args in (("cluster", []), ("cast", []), ("lowrank", ["--rank-ratio", "0.25"])):
    if _stage in REGISTRY:
        RECIPES[_stage] = [_stage, *_args]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Entry]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, {e.name: e for e in build_corpus(root)}


def test_corpus_size(corpus, capsys: pytest.CaptureFixture) -> None:
    _, entries = corpus
    runs = len(entries) * (len(RECIPES) + 2)
    with capsys.disabled():
        print(f"\nbad-input corpus: {len(entries)} entries, each through compress "
              f"({', '.join(RECIPES)}), inspect and decompress: {runs} CLI runs")
    assert len(entries) >= 40
    assert sorted(entries) == sorted(names())


def snapshot(root: Path, entry: Entry) -> dict[str, str]:
    """sha256 of every file of the entry's folder and of the corpus root (links: their target)."""
    digests = {}
    files = list(entry.path.parent.rglob("*")) + [p for p in root.iterdir() if not p.is_dir()]
    for path in sorted(files):
        if path.is_symlink():
            digests[str(path)] = "link:" + str(path.readlink())
        elif path.is_file():
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def with_stage_args(stages: list[str], extra: tuple[str, ...]) -> list[str]:
    """Append `extra` after every stage of a one-stage recipe."""
    return stages + list(extra)


def names_input(line: str, entry: Entry) -> bool:
    """The line names the input file (for a sharded checkpoint: its index or a shard)."""
    if entry.path.name.endswith(INDEX_SUFFIX):
        return f"{entry.path.parent}/" in line
    return str(entry.path) in line


def assert_failed(result: Result, entry: Entry, expected: str, out_dir: Path) -> None:
    assert result.exit_code == 1, (entry.name, result.output)
    assert isinstance(result.exception, SystemExit), (entry.name, repr(result.exception))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, (entry.name, result.stderr)
    assert lines[0].startswith("Error: "), lines
    assert names_input(lines[0], entry), lines[0]
    assert expected in lines[0], (entry.name, expected, lines[0])
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == [], (entry.name, list(out_dir.iterdir()))


def assert_ok(result: Result, entry: Entry) -> None:
    assert result.exit_code == 0, (entry.name, result.output, repr(result.exception))
    assert result.exception is None


def tensors_of(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Logical tensor name -> (shape, dtype) as a reader sees the model."""
    return {name: (tuple(info.shape), str(info.dtype))
            for name, info, _, _ in open_model(path).logical_tensors()}


def output_suffix(path: Path) -> str:
    """'.onnx', '.safetensors' or, for a sharded checkpoint, '.safetensors.index.json'."""
    return INDEX_SUFFIX if path.name.endswith(INDEX_SUFFIX) else path.suffix


def written(out: Path) -> list[str]:
    """The file names a model output consists of: the file, or an index and its shards."""
    if not out.name.endswith(INDEX_SUFFIX):
        return [out.name]
    return [out.name] + sorted(set(json.loads(out.read_text())["weight_map"].values()))


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_compressed(entry: Entry, out: Path, report_path: Path, work: Path) -> None:
    """The output reads back with the input's tensors; unchanged ones are bit-identical."""
    if out.suffix == ".onnx":
        onnx.checker.check_model(str(out), full_check=True)
    assert tensors_of(out) == tensors_of(entry.path)
    report = json.loads(report_path.read_text())
    assert report["totals"]["file_bytes_after"] == sum(
        (out.parent / name).stat().st_size for name in written(out))
    changed = {row["name"] for row in report["tensors"]}
    assert not changed & set(entry.untouched), (entry.name, changed)
    (work / "dense").mkdir(exist_ok=True)
    dense = work / "dense" / f"dense{output_suffix(out)}"
    decompress(out, dense)
    src, back = open_model(entry.path), open_model(dense)
    for name in src.tensors:
        original, restored = src.read(name), back.read(name)
        if name not in changed:
            assert same_bytes(original, restored), (entry.name, name)
            continue
        assert restored.shape == original.shape and restored.dtype == original.dtype
        restored32, original32 = restored.astype(np.float32), original.astype(np.float32)
        assert np.isfinite(restored32).all()
        norm = float(np.linalg.norm(original32))
        error = float(np.linalg.norm(restored32 - original32))
        assert error <= norm * 1.0 + 1e-6, (entry.name, name, error, norm)
    for name in written(dense):
        (dense.parent / name).unlink()


@pytest.mark.parametrize("name", names())
def test_corpus_entry(corpus, name: str, tmp_path: Path) -> None:
    root, entries = corpus
    entry = entries[name]
    before = snapshot(root, entry)
    suffix = output_suffix(entry.path)

    for recipe, stages in RECIPES.items():
        out_dir = tmp_path / recipe
        out_dir.mkdir()
        out, report = out_dir / f"out{suffix}", out_dir / "report.json"
        result = run_cli(["compress", entry.path, "-o", out, "--report", report,
                          *entry.group_args, *with_stage_args(stages, entry.stage_args)])
        expected = entry.expected_error("compress", recipe)
        if expected is None:
            assert_ok(result, entry)
            assert sorted(p.name for p in out_dir.iterdir()) == sorted(written(out) + [report.name])
            check_compressed(entry, out, report, tmp_path)
        else:
            assert_failed(result, entry, expected, out_dir)
        assert snapshot(root, entry) == before, (entry.name, recipe)

    result = run_cli(["inspect", entry.path, "--format", "json"])
    if entry.expected_error("inspect") is not None:
        (tmp_path / "inspect").mkdir()
        assert_failed(result, entry, entry.expected_error("inspect"), tmp_path / "inspect")
    else:
        assert_ok(result, entry)
        shown = {t["name"] for t in json.loads(result.stdout)["tensors"]}
        assert shown == set(tensors_of(entry.path))

    out_dir = tmp_path / "decompress"
    out_dir.mkdir()
    out = out_dir / f"out{suffix}"
    result = run_cli(["decompress", entry.path, "-o", out])
    expected = entry.expected_error("decompress")
    if expected is not None:
        assert_failed(result, entry, expected, out_dir)
    else:
        assert_ok(result, entry)
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(written(out))
        assert tensors_of(out) == tensors_of(entry.path)
        src, dense = open_model(entry.path), open_model(out)
        for name in src.tensors:
            if name not in src.encodings and name in dense.tensors:
                assert same_bytes(src.read(name), dense.read(name)), name

    assert snapshot(root, entry) == before
    assert not marker_path(root).exists(), "a pickle was loaded"
    assert not list(root.rglob("*.modelpress-tmp"))


def test_every_entry_kind_of_the_issue_is_present() -> None:
    """The kinds the issue lists, by entry name (a renamed entry must keep its kind)."""
    required = ["empty-onnx", "empty-safetensors", "random-bytes-onnx", "random-bytes-safetensors",
                "st-length-exceeds-file", "st-malformed-json", "st-overlapping-offsets",
                "st-offsets-past-end", "st-unknown-dtype", "st-shape-bytes-mismatch",
                "st-multi-gigabyte-header-length", "onnx-raw-data-length-mismatch",
                "onnx-missing-weight-input", "onnx-external-absolute", "onnx-external-escapes",
                "onnx-external-missing", "onnx-external-too-short", "st-nan-weight",
                "st-inf-weight-allow-nonfinite", "st-all-zeros", "st-single-element",
                "st-zero-elements-huge-dim", "st-int64-named", "st-bool-named", "st-fp16",
                "st-bf16", "onnx-fp16", "onnx-scalar-and-zero-element-initializers",
                "st-huge-dims-truncated-body", "onnx-external-huge-dims"]
    assert not set(required) - set(names())
    assert sum(n.startswith("truncated-") for n in names()) >= 6
