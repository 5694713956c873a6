"""Write the small, deterministic sample models that modelpress tests and docs use.

Run ``python sample_models/generate.py [--out DIR]``; DIR defaults to this folder.
Writes an MLP trained with numpy (plus a held-out set), a tiny CNN with random weights
and a one-block transformer LM trained with numpy on a synthetic next-token task (plus
held-out sequences), each as ``.onnx`` and ``.safetensors`` holding the same tensors;
and, as ``.onnx`` only with evaluation inputs, a MobileNet-style CNN (depthwise separable
convolutions) and an LSTM + GRU sequence model, both with random initial weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

OPSET = 17
IR_VERSION = 8
PRODUCER = "modelpress-sample-models"
METADATA = {"format": "pt"}

MLP_SIZES = (64, 256, 128, 10)
MLP_EPOCHS = 10
MLP_TRAIN, MLP_TEST = 12000, 1000
MLP_LATENT, MLP_CLUSTERS, MLP_NOISE = 16, 3, 0.8

VOCAB, D_MODEL, HEADS, FFN, MAX_POS = 512, 64, 4, 256, 64
HEAD_DIM = D_MODEL // HEADS
LN_EPS = 1e-5
MASK_VALUE = -1e9
# Transformer training task and schedule (see make_lm_process / sample_lm_sequences).
LM_SUCCESSORS, LM_SEQ, LM_PERIOD, LM_REPEAT = 4, 32, 8, 0.5
LM_STEPS, LM_BATCH, LM_LR, LM_WARMUP, LM_WEIGHT_DECAY = 1000, 32, 3e-3, 50, 0.1
LM_TEST = 64

Params = dict[str, np.ndarray]


class GraphBuilder:
    """Collects nodes, initializers and constants for one ONNX graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a named initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """Add a Constant node (kept out of the initializer list) and return its output."""
        tensor = numpy_helper.from_array(np.asarray(array), name)
        self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        return name

    def ints(self, name: str, values: int | list[int]) -> str:
        """Add an int64 Constant node (a scalar or a 1-D shape) and return its output."""
        return self.const(name, np.array(values, np.int64))

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: object) -> str:
        """Add one node with a single output named ``output`` and return that name."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def model(self, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        """Wrap the graph in a checked opset-17, IR-8 model."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
            ir_version=IR_VERSION,
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Serialize an ONNX model with all tensors inline."""
    path.write_bytes(model.SerializeToString())


def save_safetensors(params: Params, path: Path) -> None:
    """Write float32 tensors in torch layout with the standard metadata."""
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(path), metadata=METADATA)


# --- MLP ---------------------------------------------------------------------


def make_mlp_data(
    rng: np.random.Generator, n_train: int, n_test: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Sample train and test sets: 10 classes, each a few Gaussian clusters warped into 64 features."""
    centers = rng.normal(0.0, 1.0, (10, MLP_CLUSTERS, MLP_LATENT))
    lift = rng.normal(0.0, 1.0 / np.sqrt(MLP_LATENT), (MLP_LATENT, 64))
    shift = rng.normal(0.0, 0.5, 64)
    mix = rng.normal(0.0, 1.0 / np.sqrt(64), (64, 64))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        cluster = rng.integers(0, MLP_CLUSTERS, n)
        latent = centers[labels, cluster] + MLP_NOISE * rng.normal(size=(n, MLP_LATENT))
        features = 2.0 * np.tanh(1.5 * latent @ lift + shift) @ mix
        features += 0.05 * rng.normal(size=features.shape)
        return features.astype(np.float32), labels.astype(np.int64)

    return sample(n_train), sample(n_test)


def mlp_forward(params: Params, x: np.ndarray) -> np.ndarray:
    """Logits of the MLP for inputs ``x`` [N, 64], torch-layout weights."""
    h = x
    for i in (1, 2, 3):
        h = h @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        if i < 3:
            h = np.maximum(h, 0)
    return h


def _mlp_gradients(params: Params, x: np.ndarray, y: np.ndarray) -> Params:
    """Softmax cross-entropy gradients of every MLP parameter on one batch."""
    acts = [x]
    for i in (1, 2):
        acts.append(np.maximum(acts[-1] @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"], 0))
    logits = acts[-1] @ params["fc3.weight"].T + params["fc3.bias"]
    grad = np.exp(logits - logits.max(axis=1, keepdims=True))
    grad /= grad.sum(axis=1, keepdims=True)
    grad[np.arange(len(y)), y] -= 1.0
    grad /= len(y)
    grads: Params = {}
    for i in (3, 2, 1):
        grads[f"fc{i}.weight"] = grad.T @ acts[i - 1]
        grads[f"fc{i}.bias"] = grad.sum(axis=0)
        if i > 1:
            grad = (grad @ params[f"fc{i}.weight"]) * (acts[i - 1] > 0)
    return grads


def train_mlp(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, epochs: int, batch: int = 128
) -> Params:
    """Train the 64-256-128-10 ReLU MLP with Adam; returns float32 torch-layout weights."""
    params: Params = {}
    for i, (n_in, n_out) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:]), start=1):
        params[f"fc{i}.weight"] = rng.normal(0.0, np.sqrt(2.0 / n_in), (n_out, n_in))
        params[f"fc{i}.bias"] = np.zeros(n_out)
    first = {k: np.zeros_like(v) for k, v in params.items()}
    second = {k: np.zeros_like(v) for k, v in params.items()}
    # Train in float64 so BLAS rounding differences between machines stay far below float32.
    x64, step, lr, b1, b2 = x.astype(np.float64), 0, 1e-3, 0.9, 0.999
    for _ in range(epochs):
        order = rng.permutation(len(x64))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            step += 1
            for name, g in _mlp_gradients(params, x64[idx], y[idx]).items():
                first[name] = b1 * first[name] + (1 - b1) * g
                second[name] = b2 * second[name] + (1 - b2) * g * g
                m_hat = first[name] / (1 - b1**step)
                v_hat = second[name] / (1 - b2**step)
                params[name] -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return {k: v.astype(np.float32) for k, v in params.items()}


def build_mlp_onnx(params: Params) -> onnx.ModelProto:
    """Gemm(transB=1) layers with torch-layout [out, in] weight initializers."""
    g = GraphBuilder()
    h = "input"
    for i in (1, 2, 3):
        w = g.initializer(f"fc{i}.weight", params[f"fc{i}.weight"])
        b = g.initializer(f"fc{i}.bias", params[f"fc{i}.bias"])
        h = g.op("Gemm", [h, w, b], "logits" if i == 3 else f"fc{i}.out", transB=1)
        if i < 3:
            h = g.op("Relu", [h], f"relu{i}.out")
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    return g.model("mlp", inputs, outputs)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float(np.mean(logits.argmax(axis=1) == labels))


# --- CNN ---------------------------------------------------------------------


def init_cnn(rng: np.random.Generator) -> Params:
    """He-initialised conv weights [out, in, kh, kw], fc [10, 64], small random biases."""
    params: Params = {}
    for i, (c_in, c_out) in enumerate(((3, 16), (16, 32), (32, 64)), start=1):
        params[f"conv{i}.weight"] = rng.normal(0.0, np.sqrt(2.0 / (c_in * 9)), (c_out, c_in, 3, 3))
        params[f"conv{i}.bias"] = rng.normal(0.0, 0.01, c_out)
    params["fc.weight"] = rng.normal(0.0, np.sqrt(2.0 / 64), (10, 64))
    params["fc.bias"] = rng.normal(0.0, 0.01, 10)
    return {k: v.astype(np.float32) for k, v in params.items()}


def build_cnn_onnx(params: Params) -> onnx.ModelProto:
    """Three 3x3 Conv+Relu (strides 1, 2, 2), GlobalAveragePool, Flatten, Gemm."""
    g = GraphBuilder()
    h = "image"
    for i, stride in ((1, 1), (2, 2), (3, 2)):
        w = g.initializer(f"conv{i}.weight", params[f"conv{i}.weight"])
        b = g.initializer(f"conv{i}.bias", params[f"conv{i}.bias"])
        h = g.op(
            "Conv", [h, w, b], f"conv{i}.out",
            kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride],
        )
        h = g.op("Relu", [h], f"relu{i}.out")
    h = g.op("GlobalAveragePool", [h], "pool.out")
    h = g.op("Flatten", [h], "flatten.out", axis=1)
    w = g.initializer("fc.weight", params["fc.weight"])
    b = g.initializer("fc.bias", params["fc.bias"])
    g.op("Gemm", [h, w, b], "logits", transB=1)
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    return g.model("cnn", inputs, outputs)


# --- MobileNet-style CNN --------------------------------------------------------

# (channels, kernel) of the patchify stem; (kernel, stride, output channels) of each
# depthwise separable block.
MOBILENET_STEM = (96, 4)
MOBILENET_BLOCKS = ((7, 1, 192), (7, 2, 256))
MOBILENET_CLASSES, MOBILENET_SIZE, MOBILENET_TEST = 16, 32, 8


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """He-normal weights times a log-normal gain per output channel (axis 0), as a
    BatchNorm folded into the convolution leaves them."""
    gain = np.exp(rng.normal(0.0, 0.5, (shape[0],) + (1,) * (len(shape) - 1)))
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape) * gain


def init_mobilenet(rng: np.random.Generator) -> Params:
    """Conv weights [out, in / group, k, k] (see _he), folded-BatchNorm biases, fc [classes, in]."""
    params: Params = {}
    channels, k = MOBILENET_STEM
    params["stem.weight"] = _he(rng, (channels, 3, k, k), 3 * k * k)
    params["stem.bias"] = rng.normal(0.0, 0.05, channels)
    for i, (k, _, out) in enumerate(MOBILENET_BLOCKS):
        params[f"blocks.{i}.dw.weight"] = _he(rng, (channels, 1, k, k), k * k)
        params[f"blocks.{i}.dw.bias"] = rng.normal(0.0, 0.05, channels)
        params[f"blocks.{i}.pw.weight"] = _he(rng, (out, channels, 1, 1), channels)
        params[f"blocks.{i}.pw.bias"] = rng.normal(0.0, 0.05, out)
        channels = out
    params["fc.weight"] = rng.normal(0.0, np.sqrt(1.0 / channels), (MOBILENET_CLASSES, channels))
    params["fc.bias"] = np.zeros(MOBILENET_CLASSES)
    return {k: v.astype(np.float32) for k, v in params.items()}


def build_mobilenet_onnx(params: Params) -> onnx.ModelProto:
    """Patchify stem (k x k, stride k), then depthwise k x k + pointwise 1x1 blocks, each
    conv followed by ReLU6 (Clip 0..6); GlobalAveragePool, Flatten, Gemm."""
    g = GraphBuilder()
    low, high = g.const("relu6.min", np.array(0.0, np.float32)), g.const("relu6.max", np.array(6.0, np.float32))

    def conv(x: str, name: str, stride: int, group: int) -> str:
        w = params[f"{name}.weight"]
        k = w.shape[-1]
        pad = 0 if name == "stem" else k // 2
        x = g.op("Conv", [x, g.initializer(f"{name}.weight", w), g.initializer(f"{name}.bias", params[f"{name}.bias"])],
                 f"{name}.out", kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)
        return g.op("Clip", [x, low, high], f"{name}.act")

    h = conv("image", "stem", MOBILENET_STEM[1], 1)
    for i, (_, stride, _) in enumerate(MOBILENET_BLOCKS):
        h = conv(h, f"blocks.{i}.dw", stride, params[f"blocks.{i}.dw.weight"].shape[0])
        h = conv(h, f"blocks.{i}.pw", 1, 1)
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h], "pool.out")], "flatten.out", axis=1)
    w, b = g.initializer("fc.weight", params["fc.weight"]), g.initializer("fc.bias", params["fc.bias"])
    g.op("Gemm", [h, w, b], "logits", transB=1)
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, MOBILENET_SIZE, MOBILENET_SIZE])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", MOBILENET_CLASSES])]
    return g.model("mobilenet", inputs, outputs)


def synthetic_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` smooth RGB images [n, 3, size, size]: a colour gradient plus a few Gaussian blobs,
    rounded to 8-bit levels like decoded pictures, then normalised ((v/255 - 0.5) / 0.25)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, 3, size, size))
    for image in images:
        image[:] = rng.uniform(0.2, 0.8, (3, 1, 1)) + rng.normal(0, 0.2, (3, 1, 1)) * (xx - yy)
        for _ in range(5):
            cy, cx, width = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
            image += rng.normal(0, 0.4, (3, 1, 1)) * blob
    pixels = np.clip(np.round(images * 255), 0, 255)
    return ((pixels / 255 - 0.5) / 0.25).astype(np.float32)


# --- LSTM + GRU ------------------------------------------------------------------

# Input features per frame, LSTM hidden size, GRU hidden size (bidirectional), classes.
RNN_FEATURES, RNN_LSTM, RNN_GRU, RNN_CLASSES = 40, 96, 40, 64
RNN_TEST, RNN_FRAMES = 4, 32


def init_recurrent(rng: np.random.Generator) -> Params:
    """ONNX-layout LSTM W [1, 4H, in], R [1, 4H, H], B [1, 8H] and bidirectional GRU
    W [2, 3H, in], R [2, 3H, H], B [2, 6H], each uniform in +-1/sqrt(H) (PyTorch's
    default); head [2H, classes] uniform in +-1/sqrt(2H), zero bias."""
    def uniform(shape: tuple[int, ...], fan: int) -> np.ndarray:
        return rng.uniform(-1.0 / np.sqrt(fan), 1.0 / np.sqrt(fan), shape)

    h, h2 = RNN_LSTM, RNN_GRU
    params = {
        "lstm.W": uniform((1, 4 * h, RNN_FEATURES), h), "lstm.R": uniform((1, 4 * h, h), h),
        "lstm.B": uniform((1, 8 * h), h),
        "gru.W": uniform((2, 3 * h2, h), h2), "gru.R": uniform((2, 3 * h2, h2), h2),
        "gru.B": uniform((2, 6 * h2), h2),
        "head.weight": uniform((2 * h2, RNN_CLASSES), 2 * h2), "head.bias": np.zeros(RNN_CLASSES),
    }
    return {k: v.astype(np.float32) for k, v in params.items()}


def build_recurrent_onnx(params: Params) -> onnx.ModelProto:
    """features [batch, time, in] -> Transpose -> LSTM -> bidirectional GRU (linear before
    reset, as PyTorch) -> [batch, time, 2H] -> MatMul + Add: per-frame logits."""
    g = GraphBuilder()
    for name, array in params.items():
        g.initializer(name, array)
    x = g.op("Transpose", ["features"], "time_major", perm=[1, 0, 2])
    g.nodes.append(helper.make_node("LSTM", [x, "lstm.W", "lstm.R", "lstm.B"], ["lstm.Y"], name="lstm",
                                    hidden_size=RNN_LSTM))
    x = g.op("Squeeze", ["lstm.Y", g.ints("lstm.directions", [1])], "lstm.out")
    g.nodes.append(helper.make_node("GRU", [x, "gru.W", "gru.R", "gru.B"], ["gru.Y"], name="gru",
                                    hidden_size=RNN_GRU, direction="bidirectional", linear_before_reset=1))
    x = g.op("Transpose", ["gru.Y"], "gru.batch_major", perm=[2, 0, 1, 3])
    x = g.op("Reshape", [x, g.ints("gru.merge", [0, 0, -1])], "gru.out")
    g.op("Add", [g.op("MatMul", [x, "head.weight"], "head.out"), "head.bias"], "logits")
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "time", RNN_FEATURES])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", RNN_CLASSES])]
    return g.model("recurrent", inputs, outputs)


def synthetic_features(rng: np.random.Generator, n: int, frames: int) -> np.ndarray:
    """``n`` sequences [n, frames, RNN_FEATURES] like log-mel frames: a random walk over
    time per band, smoothed across bands, rounded to steps of 1/16."""
    walk = np.cumsum(rng.normal(0, 0.3, (n, frames, RNN_FEATURES)), axis=1)
    smooth = (walk + np.roll(walk, 1, axis=2) + np.roll(walk, -1, axis=2)) / 3
    return (np.round(16 * (smooth + rng.normal(0, 1, (n, 1, RNN_FEATURES)))) / 16).astype(np.float32)


# --- transformer ---------------------------------------------------------------


def make_lm_process(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A fixed sparse Markov chain over the vocabulary: each token has LM_SUCCESSORS
    distinct successors with Dirichlet(1) probabilities. Returns (successors, probs), [VOCAB, K]."""
    successors = np.stack([rng.choice(VOCAB, LM_SUCCESSORS, replace=False) for _ in range(VOCAB)])
    probs = rng.dirichlet(np.ones(LM_SUCCESSORS), VOCAB)
    return successors.astype(np.int64), probs


def sample_lm_sequences(
    rng: np.random.Generator, process: tuple[np.ndarray, np.ndarray], n: int
) -> np.ndarray:
    """``n`` int64 sequences of LM_SEQ tokens: a walk on the Markov chain from a uniform start;
    with probability LM_REPEAT the sequence instead repeats its first LM_PERIOD tokens."""
    successors, probs = process
    cumulative = np.cumsum(probs, axis=1)
    seqs = np.empty((n, LM_SEQ), np.int64)
    seqs[:, 0] = rng.integers(0, VOCAB, n)
    for t in range(1, LM_SEQ):
        prev = seqs[:, t - 1]
        choice = (rng.random(n)[:, None] > cumulative[prev]).sum(axis=1)
        seqs[:, t] = successors[prev, np.minimum(choice, LM_SUCCESSORS - 1)]
    repeat = rng.random(n) < LM_REPEAT
    for t in range(LM_PERIOD, LM_SEQ):
        seqs[repeat, t] = seqs[repeat, t - LM_PERIOD]
    return seqs


def lm_oracle_predictions(process: tuple[np.ndarray, np.ndarray], seqs: np.ndarray) -> np.ndarray:
    """Bayes-optimal next-token guesses [n, LM_SEQ - 1] given each prefix and the true process."""
    successors, probs = process
    table = np.zeros((VOCAB, VOCAB))
    np.add.at(table, (np.repeat(np.arange(VOCAB), LM_SUCCESSORS), successors.ravel()), probs.ravel())
    guesses = np.empty((len(seqs), LM_SEQ - 1), np.int64)
    for i, s in enumerate(seqs):
        walk_likelihood, consistent = 1.0, True
        for t in range(LM_SEQ - 1):
            dist = table[s[t]].copy()
            if t >= LM_PERIOD:
                walk_likelihood *= table[s[t - 1], s[t]]
                consistent = consistent and s[t] == s[t - LM_PERIOD]
            if t + 1 >= LM_PERIOD and consistent:
                repeat = LM_REPEAT / (LM_REPEAT + (1 - LM_REPEAT) * walk_likelihood)
                dist *= 1.0 - repeat
                dist[s[t + 1 - LM_PERIOD]] += repeat
            guesses[i, t] = dist.argmax()
    return guesses


def init_transformer(rng: np.random.Generator) -> Params:
    """GPT-2 style float64 init, torch layout: weights N(0, 0.02), residual outputs scaled
    by 1/sqrt(2), zero biases, LayerNorms at identity."""
    params: Params = {
        "embed_tokens.weight": rng.normal(0.0, 0.02, (VOCAB, D_MODEL)),
        "embed_positions.weight": rng.normal(0.0, 0.02, (MAX_POS, D_MODEL)),
    }
    shapes = {
        "layers.0.attn.q_proj": (D_MODEL, D_MODEL),
        "layers.0.attn.k_proj": (D_MODEL, D_MODEL),
        "layers.0.attn.v_proj": (D_MODEL, D_MODEL),
        "layers.0.attn.o_proj": (D_MODEL, D_MODEL),
        "layers.0.mlp.fc1": (FFN, D_MODEL),
        "layers.0.mlp.fc2": (D_MODEL, FFN),
    }
    for name in ("layers.0.ln1", "layers.0.ln2", "ln_f"):
        params[f"{name}.weight"] = np.ones(D_MODEL)
        params[f"{name}.bias"] = np.zeros(D_MODEL)
    for name, shape in shapes.items():
        std = 0.02 / np.sqrt(2.0) if name.endswith(("o_proj", "fc2")) else 0.02
        params[f"{name}.weight"] = rng.normal(0.0, std, shape)
        params[f"{name}.bias"] = np.zeros(shape[0])
    params["lm_head.weight"] = rng.normal(0.0, 0.02, (VOCAB, D_MODEL))
    return params


def _layer_norm_cached(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    centered = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + LN_EPS)
    normed = centered * rstd
    return normed * weight + bias, (normed, rstd, weight)


def _layer_norm_backward(
    grad: np.ndarray, cache: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (input, weight, bias) of a LayerNorm over rows of a 2-D array."""
    normed, rstd, weight = cache
    g = grad * weight
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - normed * (g * normed).mean(axis=-1, keepdims=True))
    return dx, (grad * normed).sum(axis=0), grad.sum(axis=0)


def transformer_loss_and_gradients(
    params: Params, input_ids: np.ndarray, targets: np.ndarray
) -> tuple[float, Params]:
    """Mean next-token cross-entropy over all positions and its gradient for every parameter.

    Same computation as ``transformer_forward`` (float64, torch layout), written on
    [batch*sequence, features] rows with a hand-written backward pass.
    """
    batch, seq = input_ids.shape
    rows = batch * seq
    p = params
    attn = "layers.0.attn"
    qkv_weight = np.concatenate([p[f"{attn}.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
    qkv_bias = np.concatenate([p[f"{attn}.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
    scale = 1.0 / np.sqrt(HEAD_DIM)

    x0 = p["embed_tokens.weight"][input_ids.ravel()] + np.tile(p["embed_positions.weight"][:seq], (batch, 1))
    h1, ln1 = _layer_norm_cached(x0, p["layers.0.ln1.weight"], p["layers.0.ln1.bias"])
    qkv = (h1 @ qkv_weight.T + qkv_bias).reshape(batch, seq, 3, HEADS, HEAD_DIM).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    scores[..., np.triu(np.ones((seq, seq), bool), 1)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(rows, D_MODEL)
    x1 = x0 + context @ p[f"{attn}.o_proj.weight"].T + p[f"{attn}.o_proj.bias"]
    h2, ln2 = _layer_norm_cached(x1, p["layers.0.ln2.weight"], p["layers.0.ln2.bias"])
    pre_act = h2 @ p["layers.0.mlp.fc1.weight"].T + p["layers.0.mlp.fc1.bias"]
    gate = 1.0 / (1.0 + np.exp(-1.702 * pre_act))
    act = pre_act * gate
    x2 = x1 + act @ p["layers.0.mlp.fc2.weight"].T + p["layers.0.mlp.fc2.bias"]
    hf, lnf = _layer_norm_cached(x2, p["ln_f.weight"], p["ln_f.bias"])
    logits = hf @ p["lm_head.weight"].T
    logits -= logits.max(axis=-1, keepdims=True)
    softmax = np.exp(logits)
    total = softmax.sum(axis=-1, keepdims=True)
    row_ids, target_ids = np.arange(rows), targets.ravel()
    loss = float(np.mean(np.log(total[:, 0]) - logits[row_ids, target_ids]))

    grads: Params = {}
    d_logits = softmax / total
    d_logits[row_ids, target_ids] -= 1.0
    d_logits /= rows
    grads["lm_head.weight"] = d_logits.T @ hf
    d_x2, grads["ln_f.weight"], grads["ln_f.bias"] = _layer_norm_backward(d_logits @ p["lm_head.weight"], lnf)
    grads["layers.0.mlp.fc2.weight"] = d_x2.T @ act
    grads["layers.0.mlp.fc2.bias"] = d_x2.sum(axis=0)
    d_pre = (d_x2 @ p["layers.0.mlp.fc2.weight"]) * (gate * (1.0 + 1.702 * pre_act * (1.0 - gate)))
    grads["layers.0.mlp.fc1.weight"] = d_pre.T @ h2
    grads["layers.0.mlp.fc1.bias"] = d_pre.sum(axis=0)
    d_x1, grads["layers.0.ln2.weight"], grads["layers.0.ln2.bias"] = _layer_norm_backward(
        d_pre @ p["layers.0.mlp.fc1.weight"], ln2
    )
    d_x1 += d_x2
    grads[f"{attn}.o_proj.weight"] = d_x1.T @ context
    grads[f"{attn}.o_proj.bias"] = d_x1.sum(axis=0)
    d_context = (d_x1 @ p[f"{attn}.o_proj.weight"]).reshape(batch, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    d_probs = d_context @ v.transpose(0, 1, 3, 2)
    d_scores = probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True)) * scale
    d_qkv = np.stack([d_scores @ k, d_scores.transpose(0, 1, 3, 2) @ q, probs.transpose(0, 1, 3, 2) @ d_context])
    d_qkv = d_qkv.transpose(1, 3, 0, 2, 4).reshape(rows, 3 * D_MODEL)
    d_weight, d_bias = d_qkv.T @ h1, d_qkv.sum(axis=0)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        grads[f"{attn}.{name}.weight"] = d_weight[i * D_MODEL : (i + 1) * D_MODEL]
        grads[f"{attn}.{name}.bias"] = d_bias[i * D_MODEL : (i + 1) * D_MODEL]
    d_x0, grads["layers.0.ln1.weight"], grads["layers.0.ln1.bias"] = _layer_norm_backward(d_qkv @ qkv_weight, ln1)
    d_x0 += d_x1
    grads["embed_tokens.weight"] = np.zeros_like(p["embed_tokens.weight"])
    np.add.at(grads["embed_tokens.weight"], input_ids.ravel(), d_x0)
    grads["embed_positions.weight"] = np.zeros_like(p["embed_positions.weight"])
    grads["embed_positions.weight"][:seq] = d_x0.reshape(batch, seq, D_MODEL).sum(axis=0)
    return loss, grads


def train_transformer(
    rng: np.random.Generator, sequences: np.ndarray, steps: int, batch: int = LM_BATCH
) -> tuple[Params, float]:
    """Causal-LM training with AdamW (warmup, cosine decay, weight decay on 2-D tensors) in float64.

    Uses ``sequences[i*batch:(i+1)*batch]`` at step i, so each sequence is seen once.
    Returns float32 torch-layout weights and the mean train loss of the last 10% of steps.
    """
    params = init_transformer(rng)
    first = {k: np.zeros_like(v) for k, v in params.items()}
    second = {k: np.zeros_like(v) for k, v in params.items()}
    b1, b2, losses = 0.9, 0.99, []
    for step in range(1, steps + 1):
        ids = sequences[(step - 1) * batch : step * batch]
        loss, grads = transformer_loss_and_gradients(params, ids[:, :-1], ids[:, 1:])
        losses.append(loss)
        lr = LM_LR * min(1.0, step / LM_WARMUP) * (0.1 + 0.45 * (1.0 + np.cos(np.pi * step / steps)))
        for name, g in grads.items():
            first[name] = b1 * first[name] + (1 - b1) * g
            second[name] = b2 * second[name] + (1 - b2) * g * g
            if params[name].ndim == 2:
                params[name] *= 1.0 - lr * LM_WEIGHT_DECAY
            m_hat = first[name] / (1 - b1**step)
            v_hat = second[name] / (1 - b2**step)
            params[name] -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    tail = losses[-max(1, steps // 10) :]
    return {k: v.astype(np.float32) for k, v in params.items()}, float(np.mean(tail))


def lm_metrics(logits: np.ndarray, sequences: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of logits [n, seq-1, VOCAB] for the next tokens."""
    targets = sequences[:, 1:]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    loss = -np.take_along_axis(log_probs, targets[..., None], axis=-1).mean()
    return float(loss), float(np.mean(logits.argmax(axis=-1) == targets))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * weight + bias


def transformer_forward(params: Params, input_ids: np.ndarray) -> np.ndarray:
    """Numpy reference forward from torch-layout weights: logits [batch, sequence, VOCAB]."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    batch, seq = input_ids.shape

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    x = p["embed_tokens.weight"][input_ids] + p["embed_positions.weight"][:seq]
    h = _layer_norm(x, p["layers.0.ln1.weight"], p["layers.0.ln1.bias"])
    q, k, v = (
        linear(h, f"layers.0.attn.{n}").reshape(batch, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
        for n in ("q_proj", "k_proj", "v_proj")
    )
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
    scores = np.where(np.triu(np.ones((seq, seq), bool), 1), MASK_VALUE, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    attn = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, D_MODEL)
    x = x + linear(attn, "layers.0.attn.o_proj")
    h = linear(_layer_norm(x, p["layers.0.ln2.weight"], p["layers.0.ln2.bias"]), "layers.0.mlp.fc1")
    h = h / (1.0 + np.exp(-1.702 * h))
    x = x + linear(h, "layers.0.mlp.fc2")
    h = _layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])
    return h @ p["lm_head.weight"].T


def _positions(g: GraphBuilder) -> str:
    """Position ids 0..sequence-1 computed from the input's shape."""
    shape = g.op("Shape", ["input_ids"], "input_ids.shape")
    seq = g.op("Gather", [shape, g.ints("const.one_index", 1)], "sequence_length", axis=0)
    return g.op("Range", [g.ints("const.zero", 0), seq, g.ints("const.one", 1)], "position_ids")


def _linear(g: GraphBuilder, params: Params, x: str, name: str) -> str:
    """MatMul with an [in, out] initializer (the transposed torch weight) plus a bias Add."""
    w = g.initializer(f"{name}.weight", params[f"{name}.weight"].T.copy())
    h = g.op("MatMul", [x, w], f"{name}.matmul")
    return g.op("Add", [h, g.initializer(f"{name}.bias", params[f"{name}.bias"])], f"{name}.out")


def _norm(g: GraphBuilder, params: Params, x: str, name: str) -> str:
    w = g.initializer(f"{name}.weight", params[f"{name}.weight"])
    b = g.initializer(f"{name}.bias", params[f"{name}.bias"])
    return g.op("LayerNormalization", [x, w, b], f"{name}.out", axis=-1, epsilon=LN_EPS)


def _attention(g: GraphBuilder, params: Params, x: str, positions: str) -> str:
    """Causal multi-head self-attention; the output projection is a 2-D Gemm(transB=1)."""
    pre = "layers.0.attn"
    heads_shape = g.ints(f"{pre}.heads_shape", [0, 0, HEADS, HEAD_DIM])
    q, k, v = (
        g.op("Reshape", [_linear(g, params, x, f"{pre}.{n}"), heads_shape], f"{pre}.{n}.heads")
        for n in ("q_proj", "k_proj", "v_proj")
    )
    q = g.op("Transpose", [q], f"{pre}.q", perm=[0, 2, 1, 3])
    k = g.op("Transpose", [k], f"{pre}.k_t", perm=[0, 2, 3, 1])
    v = g.op("Transpose", [v], f"{pre}.v", perm=[0, 2, 1, 3])
    scores = g.op("MatMul", [q, k], f"{pre}.scores")
    scale = g.const(f"{pre}.scale", np.array(1.0 / np.sqrt(HEAD_DIM), np.float32))
    scores = g.op("Mul", [scores, scale], f"{pre}.scaled")
    rows = g.op("Unsqueeze", [positions, g.ints("const.axis1", [1])], "query_positions")
    cols = g.op("Unsqueeze", [positions, g.ints("const.axis0", [0])], "key_positions")
    future = g.op("Greater", [cols, rows], "causal_mask")
    mask_value = g.const("const.mask_value", np.array(MASK_VALUE, np.float32))
    masked = g.op("Where", [future, mask_value, scores], f"{pre}.masked")
    probs = g.op("Softmax", [masked], f"{pre}.probs", axis=-1)
    h = g.op("MatMul", [probs, v], f"{pre}.context")
    h = g.op("Transpose", [h], f"{pre}.context_t", perm=[0, 2, 1, 3])
    h = g.op("Reshape", [h, g.ints("const.rows_by_model", [-1, D_MODEL])], f"{pre}.context_2d")
    w = g.initializer(f"{pre}.o_proj.weight", params[f"{pre}.o_proj.weight"])
    b = g.initializer(f"{pre}.o_proj.bias", params[f"{pre}.o_proj.bias"])
    h = g.op("Gemm", [h, w, b], f"{pre}.o_proj.out", transB=1)
    model_dim = g.ints("const.model_dim", [D_MODEL])
    shape = g.op("Concat", ["input_ids.shape", model_dim], "hidden_shape", axis=0)
    return g.op("Reshape", [h, shape], f"{pre}.out")


def build_transformer_onnx(params: Params) -> onnx.ModelProto:
    """One pre-LayerNorm block, final LayerNorm and LM head; MatMul weights are [in, out]."""
    g = GraphBuilder()
    table = g.initializer("embed_tokens.weight", params["embed_tokens.weight"])
    tokens = g.op("Gather", [table, "input_ids"], "token_embeddings")
    positions = _positions(g)
    table = g.initializer("embed_positions.weight", params["embed_positions.weight"])
    x = g.op("Add", [tokens, g.op("Gather", [table, positions], "position_embeddings")], "embeddings")
    attn = _attention(g, params, _norm(g, params, x, "layers.0.ln1"), positions)
    x = g.op("Add", [x, attn], "layers.0.attn_residual")
    h = _linear(g, params, _norm(g, params, x, "layers.0.ln2"), "layers.0.mlp.fc1")
    # Opset 17 has no Gelu; x * sigmoid(1.702 x) is the usual close approximation.
    gelu_scale = g.const("const.gelu_scale", np.array(1.702, np.float32))
    scaled = g.op("Mul", [h, gelu_scale], "layers.0.mlp.gelu_in")
    gate = g.op("Sigmoid", [scaled], "layers.0.mlp.gate")
    h = _linear(g, params, g.op("Mul", [h, gate], "layers.0.mlp.act"), "layers.0.mlp.fc2")
    x = g.op("Add", [x, h], "layers.0.mlp_residual")
    h = _norm(g, params, x, "ln_f")
    g.op("MatMul", [h, g.initializer("lm_head.weight", params["lm_head.weight"].T.copy())], "logits")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])]
    return g.model("transformer", inputs, outputs)


# --- driver --------------------------------------------------------------------


def lm_held_out(
    rng: np.random.Generator, process: tuple[np.ndarray, np.ndarray], train: np.ndarray, n: int
) -> np.ndarray:
    """``n`` fresh sequences from ``process``, none equal to a training sequence."""
    seen = {row.tobytes() for row in train}
    candidates = sample_lm_sequences(rng, process, 2 * n)
    fresh = [row for row in candidates if row.tobytes() not in seen]
    if len(fresh) < n:
        raise RuntimeError("held-out sampling kept repeating training sequences")
    return np.stack(fresh[:n])


def generate(
    out_dir: Path, mlp_epochs: int = MLP_EPOCHS, transformer_steps: int = LM_STEPS
) -> dict[str, float]:
    """Write every sample file into ``out_dir``; returns training and held-out metrics.

    Only the defaults ``mlp_epochs`` and ``transformer_steps`` produce the shipped files;
    fewer give a faster, equally deterministic run for tests.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = make_mlp_data(np.random.default_rng(1), MLP_TRAIN, MLP_TEST)
    mlp = train_mlp(np.random.default_rng(2), x_train, y_train, mlp_epochs)
    save_onnx(build_mlp_onnx(mlp), out_dir / "mlp.onnx")
    save_safetensors(mlp, out_dir / "mlp.safetensors")
    np.savez(out_dir / "mlp_test_inputs.npz", input=x_test)
    np.save(out_dir / "mlp_test_labels.npy", y_test)

    cnn = init_cnn(np.random.default_rng(3))
    save_onnx(build_cnn_onnx(cnn), out_dir / "cnn.onnx")
    save_safetensors(cnn, out_dir / "cnn.safetensors")

    save_onnx(build_mobilenet_onnx(init_mobilenet(np.random.default_rng(9))), out_dir / "mobilenet.onnx")
    images = synthetic_images(np.random.default_rng(10), MOBILENET_TEST, MOBILENET_SIZE)
    np.savez_compressed(out_dir / "mobilenet_test_inputs.npz", image=images)
    save_onnx(build_recurrent_onnx(init_recurrent(np.random.default_rng(11))), out_dir / "recurrent.onnx")
    features = synthetic_features(np.random.default_rng(12), RNN_TEST, RNN_FRAMES)
    np.savez_compressed(out_dir / "recurrent_test_inputs.npz", features=features)

    process = make_lm_process(np.random.default_rng(4))
    lm_train = sample_lm_sequences(np.random.default_rng(6), process, transformer_steps * LM_BATCH)
    lm_test = lm_held_out(np.random.default_rng(7), process, lm_train, LM_TEST)
    transformer, train_loss = train_transformer(np.random.default_rng(8), lm_train, transformer_steps)
    save_onnx(build_transformer_onnx(transformer), out_dir / "transformer.onnx")
    save_safetensors(transformer, out_dir / "transformer.safetensors")
    np.savez(out_dir / "transformer_test_inputs.npz", input_ids=lm_test)
    test_loss, test_accuracy = lm_metrics(transformer_forward(transformer, lm_test[:, :-1]), lm_test)
    oracle = lm_oracle_predictions(process, lm_test)
    return {
        "train_accuracy": accuracy(mlp_forward(mlp, x_train), y_train),
        "test_accuracy": accuracy(mlp_forward(mlp, x_test), y_test),
        "transformer_train_loss": train_loss,
        "transformer_test_loss": test_loss,
        "transformer_test_accuracy": test_accuracy,
        "transformer_oracle_accuracy": float(np.mean(oracle == lm_test[:, 1:])),
    }


def verify_with_onnxruntime(out_dir: Path) -> dict[str, float]:
    """Run the written ONNX files and check them against the numpy models."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    def run(name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session = ort.InferenceSession(str(out_dir / name), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    x_test = np.load(out_dir / "mlp_test_inputs.npz")["input"]
    y_test = np.load(out_dir / "mlp_test_labels.npy")
    onnx_acc = accuracy(run("mlp.onnx", {"input": x_test}), y_test)
    numpy_acc = accuracy(mlp_forward(load_file(str(out_dir / "mlp.safetensors")), x_test), y_test)
    if onnx_acc != numpy_acc:
        raise AssertionError(f"mlp.onnx accuracy {onnx_acc} != numpy accuracy {numpy_acc}")

    weights = load_file(str(out_dir / "transformer.safetensors"))
    lm_test = np.load(out_dir / "transformer_test_inputs.npz")["input_ids"]
    random_ids = np.random.default_rng(5).integers(0, VOCAB, (2, MAX_POS), dtype=np.int64)
    rel, outputs = 0.0, []
    for ids in (lm_test[:, :-1], random_ids):
        outputs.append(run("transformer.onnx", {"input_ids": ids}))
        want = transformer_forward(weights, ids)
        rel = max(rel, float(np.abs(outputs[-1] - want).max() / np.abs(want).max()))
    lm_acc = lm_metrics(outputs[0], lm_test)[1]
    if rel > 1e-4:
        raise AssertionError(f"transformer.onnx differs from the numpy reference: rel error {rel:.2e}")
    for model, shape in (("mobilenet", (MOBILENET_TEST, MOBILENET_CLASSES)),
                         ("recurrent", (RNN_TEST, RNN_FRAMES, RNN_CLASSES))):
        with np.load(out_dir / f"{model}_test_inputs.npz") as feeds:
            logits = run(f"{model}.onnx", dict(feeds))
        if logits.shape != shape or not np.isfinite(logits).all():
            raise AssertionError(f"{model}.onnx gave logits {logits.shape}, expected finite {shape}")
    return {"onnx_test_accuracy": onnx_acc, "transformer_rel_error": rel, "transformer_onnx_accuracy": lm_acc}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    stats = generate(args.out)
    elapsed = time.perf_counter() - started
    print(f"mlp train accuracy {stats['train_accuracy']:.4f}, test accuracy {stats['test_accuracy']:.4f}")
    print(f"transformer train loss {stats['transformer_train_loss']:.4f} (last 10% of steps), "
          f"held-out loss {stats['transformer_test_loss']:.4f}, "
          f"held-out next-token accuracy {stats['transformer_test_accuracy']:.4f} "
          f"(Bayes-optimal {stats['transformer_oracle_accuracy']:.4f})")
    print(f"generated in {elapsed:.1f} s into {args.out}")
    try:
        checks = verify_with_onnxruntime(args.out)
    except ImportError:
        print("onnxruntime not installed: skipped the runtime checks")
        return 0
    print(f"onnxruntime: mlp test accuracy {checks['onnx_test_accuracy']:.4f} (matches numpy), "
          f"transformer max rel error {checks['transformer_rel_error']:.1e}, "
          f"held-out accuracy {checks['transformer_onnx_accuracy']:.4f}; mobilenet and recurrent run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
