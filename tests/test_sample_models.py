"""The committed sample models: valid, runnable, documented layout, reproducible."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from safetensors import safe_open
from safetensors.numpy import load_file

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_models"
GENERATOR = SAMPLE_DIR / "generate.py"
GENERATED = [
    "cnn.onnx",
    "cnn.safetensors",
    "mlp.onnx",
    "mlp.safetensors",
    "mlp_test_inputs.npz",
    "mlp_test_labels.npy",
    "mobilenet.onnx",
    "mobilenet_test_inputs.npz",
    "recurrent.onnx",
    "recurrent_test_inputs.npz",
    "transformer.onnx",
    "transformer.safetensors",
    "transformer_test_inputs.npz",
]
MLP_SHAPES = {
    "fc1.weight": (256, 64),
    "fc1.bias": (256,),
    "fc2.weight": (128, 256),
    "fc2.bias": (128,),
    "fc3.weight": (10, 128),
    "fc3.bias": (10,),
}
CNN_SHAPES = {
    "conv1.weight": (16, 3, 3, 3),
    "conv1.bias": (16,),
    "conv2.weight": (32, 16, 3, 3),
    "conv2.bias": (32,),
    "conv3.weight": (64, 32, 3, 3),
    "conv3.bias": (64,),
    "fc.weight": (10, 64),
    "fc.bias": (10,),
}
TRANSFORMER_SHAPES = {
    "embed_tokens.weight": (512, 64),
    "embed_positions.weight": (64, 64),
    "layers.0.ln1.weight": (64,),
    "layers.0.ln1.bias": (64,),
    **{f"layers.0.attn.{p}.weight": (64, 64) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"layers.0.attn.{p}.bias": (64,) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "layers.0.ln2.weight": (64,),
    "layers.0.ln2.bias": (64,),
    "layers.0.mlp.fc1.weight": (256, 64),
    "layers.0.mlp.fc1.bias": (256,),
    "layers.0.mlp.fc2.weight": (64, 256),
    "layers.0.mlp.fc2.bias": (64,),
    "ln_f.weight": (64,),
    "ln_f.bias": (64,),
    "lm_head.weight": (512, 64),
}
LAYOUTS = {"mlp": MLP_SHAPES, "cnn": CNN_SHAPES, "transformer": TRANSFORMER_SHAPES}
# Initializers that ONNX stores as MatMul [in, out], i.e. transposed from safetensors.
TRANSPOSED_IN_ONNX = {
    "layers.0.attn.q_proj.weight",
    "layers.0.attn.k_proj.weight",
    "layers.0.attn.v_proj.weight",
    "layers.0.mlp.fc1.weight",
    "layers.0.mlp.fc2.weight",
    "lm_head.weight",
}
SIGNATURES = {
    "mlp": ({"input": ["batch", 64]}, {"logits": ["batch", 10]}),
    "cnn": ({"image": ["batch", 3, 16, 16]}, {"logits": ["batch", 10]}),
    "transformer": ({"input_ids": ["batch", "sequence"]}, {"logits": ["batch", "sequence", 512]}),
    "mobilenet": ({"image": ["batch", 3, 32, 32]}, {"logits": ["batch", 16]}),
    "recurrent": ({"features": ["batch", "time", 40]}, {"logits": ["batch", "time", 64]}),
}
# ONNX-only samples (random initial weights, no safetensors twin) and their evaluation inputs.
ONNX_ONLY = {
    "mobilenet": {
        "stem.weight": (96, 3, 4, 4),
        "blocks.0.dw.weight": (96, 1, 7, 7),
        "blocks.0.pw.weight": (192, 96, 1, 1),
        "blocks.1.dw.weight": (192, 1, 7, 7),
        "blocks.1.pw.weight": (256, 192, 1, 1),
        "fc.weight": (16, 256),
    },
    "recurrent": {
        "lstm.W": (1, 384, 40),
        "lstm.R": (1, 384, 96),
        "gru.W": (2, 120, 96),
        "gru.R": (2, 120, 40),
        "head.weight": (80, 64),
    },
}
TEST_INPUTS = {"mobilenet": ("image", (8, 3, 32, 32)), "recurrent": ("features", (4, 32, 40))}


def load_generator() -> ModuleType:
    """Import sample_models/generate.py by path without leaving a __pycache__ behind."""
    spec = importlib.util.spec_from_file_location("modelpress_sample_models_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


gen = load_generator()


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    shape = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in shape]


def test_quick_regeneration_is_byte_identical(tmp_path: Path) -> None:
    gen.generate(tmp_path / "a", mlp_epochs=1, transformer_steps=3)
    gen.generate(tmp_path / "b", mlp_epochs=1, transformer_steps=3)
    first = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert first == GENERATED
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == GENERATED
    for name in GENERATED:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_full_regeneration_matches_committed_files(tmp_path: Path) -> None:
    # The full run trains the transformer (~35 s of CPU). One BLAS thread gives the same bytes
    # and is much faster than two when other tests share the cores.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(tmp_path)], capture_output=True, text=True, check=True, env=env
    )
    assert "matches numpy" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == GENERATED
    for model in LAYOUTS:
        fresh = load_file(str(tmp_path / f"{model}.safetensors"))
        committed = load_file(str(SAMPLE_DIR / f"{model}.safetensors"))
        for name, array in committed.items():
            # Training runs through BLAS, which may round differently on other machines.
            np.testing.assert_allclose(fresh[name], array, rtol=0, atol=1e-4, err_msg=name)
    with np.load(tmp_path / "mlp_test_inputs.npz") as fresh:
        with np.load(SAMPLE_DIR / "mlp_test_inputs.npz") as committed:
            np.testing.assert_allclose(fresh["input"], committed["input"], rtol=0, atol=1e-4)
    labels = [np.load(folder / "mlp_test_labels.npy") for folder in (tmp_path, SAMPLE_DIR)]
    np.testing.assert_array_equal(*labels)
    held_out = [np.load(folder / "transformer_test_inputs.npz")["input_ids"] for folder in (tmp_path, SAMPLE_DIR)]
    np.testing.assert_array_equal(*held_out)
    for model, (name, _) in TEST_INPUTS.items():
        fresh, committed = (onnx.load(str(folder / f"{model}.onnx")).graph for folder in (tmp_path, SAMPLE_DIR))
        for a, b in zip(fresh.initializer, committed.initializer, strict=True):
            np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=0, atol=1e-6)
        inputs = [np.load(folder / f"{model}_test_inputs.npz")[name] for folder in (tmp_path, SAMPLE_DIR)]
        np.testing.assert_allclose(*inputs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", sorted(SIGNATURES))
def test_onnx_model_is_valid_and_documented(model: str) -> None:
    proto = onnx.load(str(SAMPLE_DIR / f"{model}.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 8
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert proto.producer_name == "modelpress-sample-models"
    inputs, outputs = SIGNATURES[model]
    assert {i.name: dims(i) for i in proto.graph.input} == inputs
    assert {o.name: dims(o) for o in proto.graph.output} == outputs


@pytest.mark.parametrize(
    ("model", "feeds", "shape"),
    [
        ("mlp", {"input": np.zeros((3, 64), np.float32)}, (3, 10)),
        ("cnn", {"image": np.ones((2, 3, 16, 16), np.float32)}, (2, 10)),
        ("transformer", {"input_ids": np.arange(7, dtype=np.int64).reshape(1, 7)}, (1, 7, 512)),
        ("transformer", {"input_ids": np.zeros((3, 64), np.int64)}, (3, 64, 512)),
        ("mobilenet", {"image": np.ones((2, 3, 32, 32), np.float32)}, (2, 16)),
        ("recurrent", {"features": np.ones((3, 5, 40), np.float32)}, (3, 5, 64)),
    ],
)
def test_onnx_model_runs_with_documented_shapes(model: str, feeds: dict, shape: tuple) -> None:
    out = run_onnx(SAMPLE_DIR / f"{model}.onnx", feeds)
    assert out.shape == shape
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


def test_mlp_accuracy_on_held_out_set() -> None:
    with np.load(SAMPLE_DIR / "mlp_test_inputs.npz", allow_pickle=False) as data:
        assert list(data.keys()) == ["input"]
        x = data["input"]
    y = np.load(SAMPLE_DIR / "mlp_test_labels.npy", allow_pickle=False)
    assert (x.dtype, x.shape) == (np.float32, (1000, 64))
    assert (y.dtype, y.shape) == (np.int64, (1000,))
    assert set(np.unique(y)) == set(range(10))

    onnx_accuracy = np.mean(run_onnx(SAMPLE_DIR / "mlp.onnx", {"input": x}).argmax(axis=1) == y)
    w = load_file(str(SAMPLE_DIR / "mlp.safetensors"))
    h = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    h = np.maximum(h @ w["fc2.weight"].T + w["fc2.bias"], 0)
    numpy_accuracy = np.mean((h @ w["fc3.weight"].T + w["fc3.bias"]).argmax(axis=1) == y)
    assert 0.80 <= onnx_accuracy <= 0.99
    assert onnx_accuracy == numpy_accuracy


@pytest.mark.parametrize("model", sorted(LAYOUTS))
def test_safetensors_layout_is_documented(model: str) -> None:
    with safe_open(str(SAMPLE_DIR / f"{model}.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        found = {name: (f.get_tensor(name).shape, f.get_tensor(name).dtype) for name in f.keys()}
    assert found == {name: (shape, np.dtype(np.float32)) for name, shape in LAYOUTS[model].items()}


@pytest.mark.parametrize("model", sorted(LAYOUTS))
def test_safetensors_values_equal_onnx_initializers(model: str) -> None:
    tensors = load_file(str(SAMPLE_DIR / f"{model}.safetensors"))
    graph = onnx.load(str(SAMPLE_DIR / f"{model}.onnx")).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert sorted(initializers) == sorted(tensors)
    for name, array in tensors.items():
        expected = array.T if name in TRANSPOSED_IN_ONNX else array
        assert initializers[name].dtype == np.float32
        np.testing.assert_array_equal(initializers[name], expected, err_msg=name)


def test_transformer_matches_numpy_reference_and_is_causal() -> None:
    ids = np.random.default_rng(0).integers(0, 512, (2, 16), dtype=np.int64)
    got = run_onnx(SAMPLE_DIR / "transformer.onnx", {"input_ids": ids})
    want = gen.transformer_forward(load_file(str(SAMPLE_DIR / "transformer.safetensors")), ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    changed = ids.copy()
    changed[:, 10] = (changed[:, 10] + 1) % 512
    after = run_onnx(SAMPLE_DIR / "transformer.onnx", {"input_ids": changed})
    np.testing.assert_allclose(after[:, :10], got[:, :10], rtol=0, atol=1e-6)
    assert not np.allclose(after[:, 10:], got[:, 10:])


def load_transformer_held_out() -> np.ndarray:
    with np.load(SAMPLE_DIR / "transformer_test_inputs.npz", allow_pickle=False) as data:
        assert list(data.keys()) == ["input_ids"]
        return data["input_ids"]


def test_transformer_held_out_set_is_fresh_data_from_the_training_process() -> None:
    ids = load_transformer_held_out()
    assert (ids.dtype, ids.shape) == (np.int64, (gen.LM_TEST, gen.LM_SEQ))
    assert ids.min() >= 0 and ids.max() < 512
    process = gen.make_lm_process(np.random.default_rng(4))
    successors, _ = process
    # Every step either follows the Markov chain or repeats the token LM_PERIOD back.
    follows = (successors[ids[:, :-1]] == ids[:, 1:, None]).any(axis=2)
    repeats = np.zeros_like(follows)
    repeats[:, gen.LM_PERIOD - 1 :] = ids[:, gen.LM_PERIOD :] == ids[:, : -gen.LM_PERIOD]
    assert (follows | repeats).all()
    train = gen.sample_lm_sequences(np.random.default_rng(6), process, gen.LM_STEPS * gen.LM_BATCH)
    assert not {row.tobytes() for row in ids} & {row.tobytes() for row in train}


def test_transformer_predicts_held_out_next_tokens() -> None:
    ids = load_transformer_held_out()
    logits = run_onnx(SAMPLE_DIR / "transformer.onnx", {"input_ids": ids[:, :-1]})
    _, accuracy = gen.lm_metrics(logits, ids)
    oracle = gen.lm_oracle_predictions(gen.make_lm_process(np.random.default_rng(4)), ids)
    best = np.mean(oracle == ids[:, 1:])
    # A context-free guess tops out near 0.5 here, the Bayes-optimal predictor near 0.74.
    assert 0.6 <= accuracy <= best
    # It uses the context: inside repeated phrases it copies the token LM_PERIOD back.
    repeated = (ids[:, gen.LM_PERIOD :] == ids[:, : -gen.LM_PERIOD]).all(axis=1)
    copy_targets = ids[repeated, gen.LM_PERIOD :]
    copy_guesses = logits[repeated, gen.LM_PERIOD - 1 :].argmax(axis=-1)
    assert np.mean(copy_guesses == copy_targets) >= 0.85


def test_transformer_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(0)
    params = {k: v + rng.normal(0.0, 0.3, v.shape) for k, v in gen.init_transformer(rng).items()}
    ids, targets = rng.integers(0, 512, (2, 2, 6))
    loss, grads = gen.transformer_loss_and_gradients(params, ids, targets)
    logits = gen.transformer_forward(params, ids)
    assert loss == pytest.approx(gen.lm_metrics(logits, np.concatenate([ids[:, :1], targets], axis=1))[0])
    assert sorted(grads) == sorted(params)
    eps = 1e-5
    for name, array in params.items():
        assert grads[name].shape == array.shape
        # Only rows that the batch touches have a non-zero embedding gradient.
        rows = {"embed_tokens.weight": ids.ravel(), "embed_positions.weight": np.arange(6)}.get(
            name, np.arange(array.shape[0])
        )
        for _ in range(2):
            index = (int(rng.choice(rows)), *(int(rng.integers(0, n)) for n in array.shape[1:]))
            saved = array[index]
            array[index] = saved + eps
            plus = gen.transformer_loss_and_gradients(params, ids, targets)[0]
            array[index] = saved - eps
            minus = gen.transformer_loss_and_gradients(params, ids, targets)[0]
            array[index] = saved
            numeric = (plus - minus) / (2 * eps)
            assert grads[name][index] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, index)


@pytest.mark.parametrize("model", sorted(ONNX_ONLY))
def test_onnx_only_samples_layout_and_inputs(model: str) -> None:
    graph = onnx.load(str(SAMPLE_DIR / f"{model}.onnx")).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    assert {n: shapes[n] for n in ONNX_ONLY[model]} == ONNX_ONLY[model]
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer)
    name, shape = TEST_INPUTS[model]
    with np.load(SAMPLE_DIR / f"{model}_test_inputs.npz", allow_pickle=False) as data:
        assert list(data.keys()) == [name]
        x = data[name]
    assert (x.dtype, x.shape) == (np.float32, shape)
    out = run_onnx(SAMPLE_DIR / f"{model}.onnx", {name: x})
    assert np.isfinite(out).all() and out.std() > 0.1


def test_sample_models_total_size_is_under_2_8_mb() -> None:
    # 1.9 MB before the MobileNet-style and LSTM + GRU samples (0.37 MB each: smaller ones
    # cannot show int8 at 0.30x, as the fixed bytes of a compressed ONNX file dominate them).
    files = [p for p in SAMPLE_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 2_800_000
