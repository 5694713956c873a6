"""Atomic outputs: interrupted runs leave the old file or nothing; the input is never a target.

The signal tests run the real CLI in a subprocess on a ~64 MB safetensors
model and send the signal as soon as the temporary output file exists (and
holds data), i.e. while the writer is copying tensors. For SIGKILL nothing can
clean up, so the test also checks the temporary file is still there: proof
that the kill landed before the rename. benchmarks/kill_during_write.py runs
the same check on a 500 MB model.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from modelpress import ModelWriteError, Quantize, Recipe, compress, decompress
from modelpress.formats import open_model

from conftest import matmul_model, run_cli, rng_weights, sha256, write_safetensors
from interrupt import make_safetensors, run_cli_subprocess, run_interrupted, temp_files

MODEL_MB = 64
ATTEMPTS = 3


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_safetensors(tmp_path_factory.mktemp("big") / "in.safetensors", MODEL_MB)


def compress_args(src: Path, out: Path) -> list:
    # One tensor is quantized; the other ~60 MB are copied: a long write phase.
    return ["compress", src, "-o", out, "quantize", "--bits", "8", "--include", "layers.0.weight"]


def interrupt(src: Path, out: Path, sig: int):
    """Interrupt a run during its write; retry if the run finished before the temp file was seen."""
    for _ in range(ATTEMPTS):
        outcome = run_interrupted(compress_args(src, out), out, sig, min_temp_bytes=1 << 20)
        if outcome.signalled:
            return outcome
        out.unlink(missing_ok=True)
    pytest.fail(f"the temporary output never appeared in {ATTEMPTS} runs")


def test_sigkill_during_write_leaves_nothing_and_a_rerun_succeeds(big_model: Path,
                                                                  tmp_path: Path) -> None:
    before = sha256(big_model)
    out = tmp_path / "out.safetensors"
    outcome = interrupt(big_model, out, signal.SIGKILL)
    assert outcome.returncode == -signal.SIGKILL
    assert len(outcome.temps_after) == 1, "the kill must land before the rename"
    assert not outcome.output_exists
    assert sha256(big_model) == before
    done = run_cli_subprocess(compress_args(big_model, out))
    assert done.returncode == 0, done.stderr
    assert open_model(out).tensors["layers.1.weight"].shape == (1024, 1024)


def test_sigkill_during_write_keeps_the_old_output(big_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    write_safetensors(out, {"old": np.arange(6, dtype=np.float32)})
    old = sha256(out)
    outcome = interrupt(big_model, out, signal.SIGKILL)
    assert len(outcome.temps_after) == 1
    assert sha256(out) == old


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 1), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_sigint_and_sigterm_remove_the_temporary_file(big_model: Path, tmp_path: Path, sig: int,
                                                      code: int) -> None:
    out = tmp_path / "out.safetensors"
    outcome = interrupt(big_model, out, sig)
    assert outcome.returncode == code
    assert outcome.temps_after == [] and not outcome.output_exists
    assert "Traceback" not in outcome.stderr
    if sig == signal.SIGINT:
        assert outcome.stderr.strip() == "Aborted!"


def test_sigkill_during_onnx_write_leaves_nothing(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(2048, 2048), "w2": rng_weights(2048, 2048, seed=1)})
    out = tmp_path / "out.onnx"
    for _ in range(ATTEMPTS):
        outcome = run_interrupted(["compress", src, "-o", out, "prune", "--sparsity", "0.5"],
                                  out, signal.SIGKILL, min_temp_bytes=1)
        if outcome.signalled:
            break
        out.unlink(missing_ok=True)
    assert outcome.signalled and len(outcome.temps_after) == 1
    assert not out.exists()


# -- in-process: failures during a write ----------------------------------------


@pytest.mark.parametrize("phase", ["copy_range", "write_array"])  # assembly / spill
def test_disk_full_during_write_is_one_line_and_leaves_nothing(tmp_path: Path, samples: Path,
                                                               monkeypatch, phase: str) -> None:
    import modelpress.formats.safetensors.stream as st_stream

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(st_stream, phase, full)
    out = tmp_path / "o.safetensors"
    result = run_cli(["compress", samples / "mlp.safetensors", "-o", out, "quantize"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.strip() == (f"Error: {out}: cannot write the output (No space left on "
                                      "device); nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_an_output_name_too_long_is_one_line(tmp_path: Path, samples: Path) -> None:
    out = tmp_path / ("x" * 260 + ".onnx")
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "quantize"])
    assert result.exit_code == 1 and "cannot write here (File name too long)" in result.stderr
    ok = tmp_path / ("y" * 245 + ".onnx")  # legal, though its temp name would not be uncut
    assert run_cli(["compress", samples / "mlp.onnx", "-o", ok, "quantize"]).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == [ok.name]


def test_report_is_written_atomically(tmp_path: Path, samples: Path, monkeypatch) -> None:
    report = tmp_path / "r.json"
    report.write_text('{"old": true}\n')

    def broken_dump(data, fh, **_):
        fh.write('{"half": ')
        raise RuntimeError("interrupted")
    monkeypatch.setattr(json, "dump", broken_dump)
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "quantize",
                      "--report", report])
    assert isinstance(result.exception, RuntimeError)
    assert report.read_text() == '{"old": true}\n'
    assert not temp_files(tmp_path, report.name)


@pytest.mark.parametrize("which", ["input", "output"])
def test_report_path_may_not_be_the_input_or_output(tmp_path: Path, samples: Path,
                                                    which: str) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes((samples / "mlp.onnx").read_bytes())
    out = tmp_path / "o.onnx"
    before = sha256(src)
    report = src if which == "input" else out
    result = run_cli(["compress", src, "-o", out, "quantize", "--report", report])
    assert result.exit_code == 2
    assert f"--report {report} is the {which} model" in result.stderr
    assert sha256(src) == before and not out.exists()


# -- the input is never a target -------------------------------------------------


@pytest.mark.parametrize("link", ["hard", "symbolic", "symbolic-folder"])
@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_output_that_is_the_input_through_a_link_is_refused(tmp_path: Path, samples: Path,
                                                            link: str, fmt: str) -> None:
    src = tmp_path / "models" / f"m.{fmt}"
    src.parent.mkdir()
    src.write_bytes((samples / f"mlp.{fmt}").read_bytes())
    before = sha256(src)
    if link == "hard":
        out = tmp_path / f"alias.{fmt}"
        os.link(src, out)
    elif link == "symbolic":
        out = tmp_path / f"alias.{fmt}"
        out.symlink_to(src)
    else:
        (tmp_path / "alias").symlink_to(src.parent, target_is_directory=True)
        out = tmp_path / "alias" / f"m.{fmt}"
    for args in (["compress", src, "-o", out, "quantize"], ["decompress", src, "-o", out]):
        result = run_cli(args)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip() == (f"Error: {out}: output is the input file; choose another "
                                         "output path (modelpress never modifies its input)")
    assert sha256(src) == before


def test_output_that_is_an_external_data_file_of_the_input_is_refused(tmp_path: Path) -> None:
    w = rng_weights(64, 64)
    model = onnx.load(str(matmul_model(tmp_path / "src.onnx", {"w": w})))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="data.onnx", size_threshold=0)
    before = sha256(tmp_path / "data.onnx")
    result = run_cli(["compress", tmp_path / "m.onnx", "-o", tmp_path / "data.onnx", "quantize",
                      "--min-elements", "1"])
    assert result.exit_code == 1
    assert "output is data.onnx, an external data file of the input" in result.stderr
    assert sha256(tmp_path / "data.onnx") == before


def test_external_data_input_compresses_and_stays_unchanged(tmp_path: Path) -> None:
    w = rng_weights(64, 64)
    model = onnx.load(str(matmul_model(tmp_path / "src.onnx", {"w": w})))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    before = {p.name: sha256(p) for p in tmp_path.iterdir()}
    compress(tmp_path / "m.onnx", tmp_path / "o.onnx", Recipe([Quantize(include=("w",))]))
    decompress(tmp_path / "o.onnx", tmp_path / "d.onnx")
    assert {p.name: sha256(p) for p in tmp_path.iterdir() if p.name in before} == before
    assert np.abs(open_model(tmp_path / "d.onnx").read("w") - w).max() < 0.05


def test_write_refusal_leaves_the_output_folder_empty(tmp_path: Path, samples: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ModelWriteError):
        compress(samples / "mlp.onnx", out_dir / "o.safetensors", Recipe([Quantize()]))
    assert list(out_dir.iterdir()) == []


def test_a_symbolic_link_at_the_output_name_is_replaced_not_written_through(
        tmp_path: Path, samples: Path) -> None:
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(b"not to be touched")
    out = tmp_path / "out.onnx"
    out.symlink_to(elsewhere)
    assert run_cli(["compress", samples / "mlp.onnx", "-o", out, "quantize"]).exit_code == 0
    assert not out.is_symlink() and open_model(out).encodings
    assert elsewhere.read_bytes() == b"not to be touched"


def test_an_output_that_is_a_loop_of_symbolic_links_is_replaced(tmp_path: Path,
                                                                samples: Path) -> None:
    out = tmp_path / "loop.onnx"
    out.symlink_to(out)
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "quantize", "--report",
                      tmp_path / "r.json"])
    assert result.exit_code == 0, repr(result.exception)
    assert not out.is_symlink() and open_model(out).encodings


@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_sweep_report_and_plot_may_not_be_the_input(tmp_path: Path, samples: Path,
                                                    option: str) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes((samples / "mlp.onnx").read_bytes())
    before = sha256(src)
    result = run_cli(["sweep", src, option, src])
    assert result.exit_code == 2
    assert f"{option} {src} is the input model" in result.stderr
    assert sha256(src) == before
