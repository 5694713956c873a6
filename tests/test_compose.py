"""Every ordered pair of stages either composes or is refused, naming what works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpress import (Cast, Cluster, Factorize, Prune, Quantize, Recipe, TensorInfo, compare, compress)
from modelpress.core.encoded import Dense
from modelpress.core.errors import UnsupportedTensorError

from conftest import matmul_model, ort_run, rng_weights

STAGES = {"quantize": Quantize(bits=4, group_size=32), "cast": Cast(dtype="fp16"),
          "prune": Prune(sparsity=0.5), "lowrank": Factorize(rank=8), "cluster": Cluster(bits=4)}
# (first, then) -> None when it composes, else a phrase of the refusal.
EXPECTED = {
    ("quantize", "quantize"): "keep one quantize stage per tensor",
    ("quantize", "cast"): "use one of quantize or cast per tensor",
    ("quantize", "prune"): None,
    ("quantize", "lowrank"): "put lowrank first: lowrank -> quantize",
    ("quantize", "cluster"): "use one of quantize or cluster per tensor",
    ("cast", "quantize"): "use one of cast or quantize per tensor",
    ("cast", "cast"): "keep one cast stage per tensor",
    ("cast", "prune"): None,
    ("cast", "lowrank"): "put lowrank first: lowrank -> cast",
    ("cast", "cluster"): "use one of cast or cluster per tensor",
    ("prune", "quantize"): None,
    ("prune", "cast"): None,
    ("prune", "prune"): None,
    ("prune", "lowrank"): "use one of prune or lowrank per tensor",
    ("prune", "cluster"): None,
    ("lowrank", "quantize"): None,
    ("lowrank", "cast"): None,
    ("lowrank", "prune"): "use one of prune or lowrank per tensor",
    ("lowrank", "lowrank"): "keep one lowrank stage per tensor",
    ("lowrank", "cluster"): None,
    ("cluster", "quantize"): "use one of cluster or quantize per tensor",
    ("cluster", "cast"): "use one of cluster or cast per tensor",
    ("cluster", "prune"): "put prune first: prune -> cluster",
    ("cluster", "lowrank"): "put lowrank first: lowrank -> cluster",
    ("cluster", "cluster"): "keep one cluster stage per tensor",
}


def test_the_table_covers_every_pair() -> None:
    assert set(EXPECTED) == {(a, b) for a in STAGES for b in STAGES}


@pytest.mark.parametrize("first, then", sorted(EXPECTED))
def test_pair(first: str, then: str) -> None:
    w = rng_weights(64, 128, seed=7)
    info = TensorInfo("w", w.shape, w.dtype, True, 0, 1)
    encoded = STAGES[first].apply(Dense(w), info)
    if EXPECTED[(first, then)] is None:
        out = STAGES[then].apply(encoded, info)
        assert out.shape == w.shape
        assert compare(w, out.decode()).rel_l2 < 1.0
        if "prune" in (first, then):
            assert int((out.decode() == 0).sum()) >= w.size // 2
    else:
        with pytest.raises(UnsupportedTensorError) as exc:
            STAGES[then].apply(encoded, info)
        message = str(exc.value)
        assert message.startswith(f"tensor 'w': {then} cannot follow a stage that made it ")
        assert EXPECTED[(first, then)] in message


def test_refusal_reaches_the_user_as_one_line(tmp_path: Path) -> None:
    # Stages that select the same tensors are refused as a usage error, before the model is
    # read (issue 16); stages with different selections meet per tensor, when it is encoded.
    from conftest import run_cli
    src = matmul_model(tmp_path / "m.onnx", {"w": rng_weights(64, 64)})
    result = run_cli(["compress", src, "-o", tmp_path / "o.onnx", "cluster", "prune"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: prune cannot follow a stage that made it palette 16 (4-bit); "
        "put prune first: prune -> cluster gives the pruned zeros an exact codebook entry")
    result = run_cli(["compress", src, "-o", tmp_path / "o.onnx", "cluster", "prune",
                      "--include", "w"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {src}: tensor 'w': prune cannot follow a stage that made it palette 16 (4-bit); "
        "put prune first: prune -> cluster gives the pruned zeros an exact codebook entry")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("first, then", [p for p, v in sorted(EXPECTED.items()) if v is None])
def test_every_working_pair_runs_in_onnxruntime(tmp_path: Path, first: str, then: str) -> None:
    w1, w2 = rng_weights(64, 96, seed=1), rng_weights(96, 80, seed=2)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w1, "w2": w2})
    report = compress(src, tmp_path / "o.onnx", Recipe([STAGES[first], STAGES[then]]))
    assert len(report.rows) == 2
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    out = ort_run(tmp_path / "o.onnx", {"x": x})[0]
    assert out.shape == (3, 80) and np.isfinite(out).all()


@pytest.mark.parametrize("first, then", [p for p, v in sorted(EXPECTED.items()) if v is None])
def test_every_working_pair_round_trips_in_safetensors(tmp_path: Path, first: str,
                                                       then: str) -> None:
    from modelpress import decompress
    from modelpress.formats import open_model
    from conftest import write_safetensors
    tensors = {"a.weight": rng_weights(96, 64, seed=1), "b.weight": rng_weights(80, 96, seed=2)}
    src = write_safetensors(tmp_path / "in.safetensors", tensors)
    stages = [STAGES[first], STAGES[then]]
    if first == then == "prune":
        stages = [Prune(sparsity=0.5), Prune(sparsity=0.8)]  # the stored form turns compact
    report = compress(src, tmp_path / "o.safetensors", Recipe(stages))
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    restored = open_model(tmp_path / "d.safetensors")
    for row in report.rows:
        assert compare(tensors[row.name], restored.read(row.name)).rel_l2 == pytest.approx(
            row.error.rel_l2, rel=1e-6)
        assert row.bytes_after < row.bytes_before
