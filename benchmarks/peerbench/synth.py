"""A synthetic decoder-style transformer (ONNX and safetensors) with realistic weight statistics.

Token embedding (Gather), `layers` pre-LayerNorm blocks of multi-head self-attention (q, k, v, o
projections) and a GELU MLP, a final LayerNorm and an untied LM head: every projection is a
MatMul. The default size has about 55M parameters. Weights are random but shaped like trained
ones: Student-t (5 degrees of freedom) values for a heavier tail than a Gaussian, a log-normal
scale per output row and per input column, and a few input columns (outlier features) three times
larger. The same values are written to safetensors in the PyTorch layout ([out, in], names of a
Hugging Face checkpoint) and to ONNX, where MatMul weights are stored [in, out] under the same
names. Deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class TransformerSize:
    """Shape of the synthetic model."""

    d_model: int = 768
    layers: int = 6
    heads: int = 12
    d_ff: int = 3072
    vocab: int = 8192

    @property
    def parameters(self) -> int:
        """Number of parameters (weights, biases and norms)."""
        d, f = self.d_model, self.d_ff
        block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        return 2 * self.vocab * d + self.layers * block + 2 * d


FULL = TransformerSize()
QUICK = TransformerSize(d_model=256, layers=2, heads=4, d_ff=1024, vocab=2048)


def _matrix(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """[rows=out, cols=in] weights: Student-t(5) with row and column scale variation."""
    w = rng.standard_t(5, size=(rows, cols)).astype(np.float32) * np.float32(std / math.sqrt(5 / 3))
    w *= np.exp(rng.normal(0, 0.3, size=(rows, 1))).astype(np.float32)
    cols_scale = np.exp(rng.normal(0, 0.2, size=(1, cols))).astype(np.float32)
    outliers = rng.choice(cols, size=max(1, cols // 100), replace=False)
    cols_scale[0, outliers] *= 3
    return w * cols_scale


def _tensors(size: TransformerSize, seed: int) -> dict[str, np.ndarray]:
    """All parameters in PyTorch layout, by Hugging Face-style name."""
    rng = np.random.default_rng(seed)
    d, f = size.d_model, size.d_ff
    t = {"model.embed_tokens.weight": _matrix(rng, size.vocab, d, 0.02)}
    for i in range(size.layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[p + norm + ".weight"] = (1 + rng.normal(0, 0.05, d)).astype(np.float32)
            t[p + norm + ".bias"] = rng.normal(0, 0.02, d).astype(np.float32)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = _matrix(rng, d, d, 1 / math.sqrt(d))
            t[p + f"self_attn.{proj}.bias"] = rng.normal(0, 0.01, d).astype(np.float32)
        t[p + "mlp.fc1.weight"] = _matrix(rng, f, d, 1 / math.sqrt(d))
        t[p + "mlp.fc1.bias"] = rng.normal(0, 0.01, f).astype(np.float32)
        t[p + "mlp.fc2.weight"] = _matrix(rng, d, f, 1 / math.sqrt(f))
        t[p + "mlp.fc2.bias"] = rng.normal(0, 0.01, d).astype(np.float32)
    t["model.norm.weight"] = (1 + rng.normal(0, 0.05, d)).astype(np.float32)
    t["model.norm.bias"] = rng.normal(0, 0.02, d).astype(np.float32)
    t["lm_head.weight"] = _matrix(rng, size.vocab, d, 1 / math.sqrt(d))
    return t


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self._n += 1
        out = out or f"{op.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out


def _graph(size: TransformerSize, t: dict[str, np.ndarray]) -> onnx.ModelProto:
    b = _Builder()
    d, h = size.d_model, size.heads
    dh = d // h
    for name, value in t.items():  # MatMul weights [in, out]; embedding and 1-D tensors as they are
        b.const(name, value.T.copy() if value.ndim == 2 and "embed" not in name else value)
    heads_shape = b.const("const.heads_shape", np.array([0, 0, h, dh], np.int64))
    model_shape = b.const("const.model_shape", np.array([0, 0, d], np.int64))
    inv_sqrt = b.const("const.inv_sqrt_dh", np.array(1 / math.sqrt(dh), np.float32))
    half = b.const("const.half", np.array(0.5, np.float32))
    one = b.const("const.one", np.array(1.0, np.float32))
    inv_sqrt2 = b.const("const.inv_sqrt2", np.array(1 / math.sqrt(2), np.float32))

    def linear(x: str, name: str, out: str | None = None) -> str:
        y = b.op("MatMul", [x, name + ".weight"], out)
        return b.op("Add", [y, name + ".bias"])

    def norm(x: str, name: str) -> str:
        return b.op("LayerNormalization", [x, name + ".weight", name + ".bias"], axis=-1, epsilon=1e-5)

    x = b.op("Gather", ["model.embed_tokens.weight", "input_ids"], "embeddings")
    for i in range(size.layers):
        p = f"model.layers.{i}."
        a = norm(x, p + "input_layernorm")
        q = b.op("Transpose", [b.op("Reshape", [linear(a, p + "self_attn.q_proj"), heads_shape])],
                 perm=[0, 2, 1, 3])
        k = b.op("Transpose", [b.op("Reshape", [linear(a, p + "self_attn.k_proj"), heads_shape])],
                 perm=[0, 2, 3, 1])
        v = b.op("Transpose", [b.op("Reshape", [linear(a, p + "self_attn.v_proj"), heads_shape])],
                 perm=[0, 2, 1, 3])
        probs = b.op("Softmax", [b.op("Mul", [b.op("MatMul", [q, k]), inv_sqrt])], axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        x = b.op("Add", [x, linear(b.op("Reshape", [ctx, model_shape]), p + "self_attn.o_proj")])
        m = linear(norm(x, p + "post_attention_layernorm"), p + "mlp.fc1")
        gelu = b.op("Mul", [b.op("Mul", [m, half]),
                            b.op("Add", [b.op("Erf", [b.op("Mul", [m, inv_sqrt2])]), one])])
        x = b.op("Add", [x, linear(gelu, p + "mlp.fc2")])
    b.op("MatMul", [norm(x, "model.norm"), "lm_head.weight"], "logits")
    graph = helper.make_graph(
        b.nodes, "synthetic_transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", "sequence", size.vocab])],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="modelpress-benchmark")
    model.ir_version = 8
    return model


def build(folder: str | Path, size: TransformerSize = FULL, seed: int = 0) -> tuple[Path, Path]:
    """Write synthetic_transformer.onnx and .safetensors into `folder`; return their paths."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(size, seed)
    onnx_path = folder / "synthetic_transformer.onnx"
    st_path = folder / "synthetic_transformer.safetensors"
    onnx.save(_graph(size, tensors), str(onnx_path))
    save_file(tensors, str(st_path), metadata={"format": "pt"})
    return onnx_path, st_path
