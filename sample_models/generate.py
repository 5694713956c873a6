"""Write the small, deterministic sample models that modelpress tests and docs use.

Run ``python sample_models/generate.py [--out DIR]``; DIR defaults to this folder.
Writes an MLP trained with numpy (plus a held-out set), a tiny CNN and a tiny
transformer block, each as ``.onnx`` and ``.safetensors`` holding the same tensors.
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


# --- transformer ---------------------------------------------------------------


def init_transformer(rng: np.random.Generator) -> Params:
    """GPT-style init, torch layout: linear weights [out, in], embeddings [rows, D]."""

    def linear(name: str, n_in: int, n_out: int, std: float | None = None) -> None:
        std = np.sqrt(2.0 / (n_in + n_out)) if std is None else std
        params[f"{name}.weight"] = rng.normal(0.0, std, (n_out, n_in))

    def norm(name: str) -> None:
        params[f"{name}.weight"] = 1.0 + rng.normal(0.0, 0.05, D_MODEL)
        params[f"{name}.bias"] = rng.normal(0.0, 0.02, D_MODEL)

    params: Params = {
        "embed_tokens.weight": rng.normal(0.0, 0.02, (VOCAB, D_MODEL)),
        "embed_positions.weight": rng.normal(0.0, 0.02, (MAX_POS, D_MODEL)),
    }
    norm("layers.0.ln1")
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        linear(f"layers.0.attn.{proj}", D_MODEL, D_MODEL)
        params[f"layers.0.attn.{proj}.bias"] = rng.normal(0.0, 0.02, D_MODEL)
    norm("layers.0.ln2")
    linear("layers.0.mlp.fc1", D_MODEL, FFN)
    params["layers.0.mlp.fc1.bias"] = rng.normal(0.0, 0.02, FFN)
    linear("layers.0.mlp.fc2", FFN, D_MODEL)
    params["layers.0.mlp.fc2.bias"] = rng.normal(0.0, 0.02, D_MODEL)
    norm("ln_f")
    # Xavier on a 64->512 head gives near-uniform softmax; 2/sqrt(D) gives logits with std ~2.
    linear("lm_head", D_MODEL, VOCAB, std=2.0 / np.sqrt(D_MODEL))
    return {k: v.astype(np.float32) for k, v in params.items()}


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


def generate(out_dir: Path, mlp_epochs: int = MLP_EPOCHS) -> dict[str, float]:
    """Write every sample file into ``out_dir``; returns the MLP's train and test accuracy.

    Only the default ``mlp_epochs`` produces the shipped files; fewer epochs give a
    faster, equally deterministic run for tests.
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

    transformer = init_transformer(np.random.default_rng(4))
    save_onnx(build_transformer_onnx(transformer), out_dir / "transformer.onnx")
    save_safetensors(transformer, out_dir / "transformer.safetensors")
    return {
        "train_accuracy": accuracy(mlp_forward(mlp, x_train), y_train),
        "test_accuracy": accuracy(mlp_forward(mlp, x_test), y_test),
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

    ids = np.random.default_rng(5).integers(0, VOCAB, (2, 16), dtype=np.int64)
    got = run("transformer.onnx", {"input_ids": ids})
    want = transformer_forward(load_file(str(out_dir / "transformer.safetensors")), ids)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    if rel > 1e-4:
        raise AssertionError(f"transformer.onnx differs from the numpy reference: rel error {rel:.2e}")
    return {"onnx_test_accuracy": onnx_acc, "transformer_rel_error": rel}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    stats = generate(args.out)
    elapsed = time.perf_counter() - started
    print(f"mlp train accuracy {stats['train_accuracy']:.4f}, test accuracy {stats['test_accuracy']:.4f}")
    print(f"generated in {elapsed:.1f} s into {args.out}")
    try:
        checks = verify_with_onnxruntime(args.out)
    except ImportError:
        print("onnxruntime not installed: skipped the runtime checks")
        return 0
    print(f"onnxruntime: mlp test accuracy {checks['onnx_test_accuracy']:.4f} (matches numpy), "
          f"transformer max rel error {checks['transformer_rel_error']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
