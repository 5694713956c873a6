"""A small transformer encoder for the static int8 benchmark, built deterministically with
onnx.helper: `layers` post-norm blocks (multi-head self-attention, GELU feed-forward,
LayerNormalization), d_model `d`, sequence `seq`, so that MatMuls dominate latency.

Like trained BERT-style encoders, a few channels of each LayerNorm's scale are large
(outlier features, OUTLIER_GAIN x the others): what breaks plain min/max int8 of
activations. Inputs are float embeddings [batch, seq, d]; the output is the last hidden
state, compared by cosine of the mean-pooled embedding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUTLIER_CHANNELS = 4
OUTLIER_GAIN = 12.0


def build(path: Path, layers: int = 4, d: int = 256, heads: int = 4, seq: int = 128,
          ffn: int = 1024, seed: int = 0) -> Path:
    """Write the encoder to `path` (deterministic for the same arguments)."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, n_in: int, n_out: int, prefix: str) -> str:
        w = const(f"{prefix}.weight", (rng.standard_normal((n_in, n_out)) /
                                       np.sqrt(n_in)).astype(np.float32))
        b = const(f"{prefix}.bias", (0.02 * rng.standard_normal(n_out)).astype(np.float32))
        return node("Add", [node("MatMul", [x, w], f"{prefix}/mm"), b], f"{prefix}/out")

    def norm(x: str, prefix: str) -> str:
        gamma = np.ones(d, np.float32)
        gamma[rng.choice(d, OUTLIER_CHANNELS, replace=False)] = OUTLIER_GAIN
        return node("LayerNormalization", [x, const(f"{prefix}.gamma", gamma),
                                           const(f"{prefix}.beta", np.zeros(d, np.float32))],
                    f"{prefix}/out", axis=-1, epsilon=1e-5)

    dh = d // heads
    split = const("shape.split", np.array([0, seq, heads, dh], np.int64))
    merge = const("shape.merge", np.array([0, seq, d], np.int64))
    scale = const("attn.scale", np.array(1.0 / np.sqrt(dh), np.float32))
    half, root2 = const("gelu.half", np.array(0.5, np.float32)), \
        const("gelu.root2", np.array(np.sqrt(2.0), np.float32))
    one = const("gelu.one", np.array(1.0, np.float32))
    x = "embeddings"
    for i in range(layers):
        p = f"layer{i}"
        q, k, v = (node("Transpose", [node("Reshape", [linear(x, d, d, f"{p}.{n}"), split],
                                           f"{p}.{n}/split")], f"{p}.{n}/heads",
                        perm=perm) for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]),
                                                   ("v", [0, 2, 1, 3])))
        scores = node("Mul", [node("MatMul", [q, k], f"{p}.scores/mm"), scale], f"{p}.scores")
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = node("Reshape", [node("Transpose", [node("MatMul", [probs, v], f"{p}.ctx/mm")],
                                    f"{p}.ctx/t", perm=[0, 2, 1, 3]), merge], f"{p}.ctx")
        x = norm(node("Add", [x, linear(ctx, d, d, f"{p}.o")], f"{p}.res1"), f"{p}.ln1")
        h = linear(x, d, ffn, f"{p}.ff1")
        erf = node("Erf", [node("Div", [h, root2], f"{p}.gelu/div")], f"{p}.gelu/erf")
        h = node("Mul", [node("Mul", [h, half], f"{p}.gelu/half"),
                         node("Add", [erf, one], f"{p}.gelu/add")], f"{p}.gelu")
        x = norm(node("Add", [x, linear(h, ffn, d, f"{p}.ff2")], f"{p}.res2"), f"{p}.ln2")
    nodes.append(helper.make_node("Identity", [x], ["hidden"], name="hidden"))
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", seq, d])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", seq, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="modelpress-benchmark")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def inputs(samples: int, seed: int, seq: int = 128, d: int = 256) -> dict[str, np.ndarray]:
    """Embedding-like inputs: unit-variance token vectors plus a shared position pattern."""
    rng = np.random.default_rng(seed)
    positions = np.sin(np.arange(seq)[:, None] / (10000 ** (np.arange(d)[None] / d)))
    x = rng.standard_normal((samples, seq, d)) + positions[None]
    return {"embeddings": x.astype(np.float32)}


def pooled_cosine(reference: np.ndarray, approx: np.ndarray) -> float:
    """Least cosine over samples between mean-pooled embeddings."""
    a, b = reference.mean(axis=1), approx.mean(axis=1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())
