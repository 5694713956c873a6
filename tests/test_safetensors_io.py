"""safetensors: the compressed-tensors layouts byte for byte, decompression, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from modelpress import Prune, Quantize, Recipe, compare, compress, decompress

from conftest import rng_weights, write_safetensors


def load_all(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="np") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def unpack_ct(packed: np.ndarray, bits: int, length: int, axis: int) -> np.ndarray:
    """compressed-tensors unpacking, written out word by word (independent of modelpress)."""
    words = packed.astype(np.int64) & 0xFFFFFFFF
    if axis == 0:
        words = words.T
    per = 32 // bits
    out = np.zeros((words.shape[0], words.shape[1] * per), np.int64)
    for i in range(per):
        out[:, i::per] = (words >> (bits * i)) & ((1 << bits) - 1)
    out = out[:, :length] - (1 << (bits - 1))
    return out.T if axis == 0 else out


@pytest.fixture
def linear(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = {"fc.weight": rng_weights(48, 200, seed=1), "fc.bias": rng_weights(48, seed=2),
               "emb.weight": rng_weights(64, 96, seed=3)}
    return write_safetensors(tmp_path / "in.safetensors", tensors, {"format": "pt"}), tensors


@pytest.mark.parametrize("bits, scheme, group", [(4, "sym", 32), (8, "sym", None),
                                                 (4, "asym", 64), (8, "asym", None)])
def test_pack_quantized_layout_and_independent_decode(tmp_path: Path, linear, bits, scheme,
                                                      group) -> None:
    src, tensors = linear
    stage = Quantize(bits=bits, scheme=scheme, group_size=group)
    report = compress(src, tmp_path / "out.safetensors", Recipe([stage]))
    stored, metadata = load_all(tmp_path / "out.safetensors")
    w = tensors["fc.weight"]
    per = 32 // bits
    assert stored["fc.weight_packed"].dtype == np.int32
    assert stored["fc.weight_packed"].shape == (48, -(-200 // per))
    assert stored["fc.weight_shape"].tolist() == [48, 200]
    assert stored["fc.weight_shape"].dtype == np.int64
    n_scales = -(-200 // group) if group else 1
    assert stored["fc.weight_scale"].shape == (48, n_scales)
    assert stored["fc.weight_scale"].dtype == np.float32
    assert "fc.weight" not in stored and "fc.bias" in stored
    np.testing.assert_array_equal(stored["fc.bias"], tensors["fc.bias"])
    q = unpack_ct(stored["fc.weight_packed"], bits, 200, axis=1)
    zp = np.zeros((48, n_scales))
    if scheme == "asym":
        assert stored["fc.weight_zero_point"].shape == (-(-48 // per), n_scales)
        zp = unpack_ct(stored["fc.weight_zero_point"], bits, 48, axis=0)
    else:
        assert "fc.weight_zero_point" not in stored  # readers fail on a symmetric zero point
    expand = (lambda a: np.repeat(a, group, axis=1)[:, :200]) if group else (lambda a: a)
    decoded = (q - expand(zp)) * expand(stored["fc.weight_scale"].astype(np.float64))
    row = next(r for r in report.rows if r.name == "fc.weight")
    assert compare(w, decoded).rel_l2 == pytest.approx(row.error.rel_l2, rel=1e-5)
    spec = json.loads(metadata["modelpress"])["tensors"]["fc.weight"]
    assert spec["layout"] == "pack-quantized" and spec["bits"] == bits
    assert metadata["format"] == "pt"
    assert row.bytes_after == sum(stored[k].nbytes for k in stored if k.startswith("fc.weight_"))


def test_three_bit_uses_modelpress_layout_and_decompresses(tmp_path: Path, linear) -> None:
    src, tensors = linear
    report = compress(src, tmp_path / "o.safetensors", Recipe([Quantize(bits=3, group_size=32)]))
    stored, metadata = load_all(tmp_path / "o.safetensors")
    codes = stored["fc.weight.mp_codes"]
    assert codes.dtype == np.uint8 and codes.size == -(-48 * 200 * 3 // 8)
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    dense, meta = load_all(tmp_path / "d.safetensors")
    assert "modelpress" not in meta
    row = next(r for r in report.rows if r.name == "fc.weight")
    assert compare(tensors["fc.weight"], dense["fc.weight"]).rel_l2 == pytest.approx(
        row.error.rel_l2, rel=1e-6)


@pytest.mark.parametrize("recipe", [[Quantize(bits=4, group_size=32)], [Quantize(bits=8)],
                                    [Prune(sparsity=0.5)], [Prune(sparsity=0.5), Quantize(bits=8)],
                                    [Quantize(bits=8), Prune(sparsity=0.7)]])
def test_decompress_restores_names_shapes_dtypes_and_table_error(tmp_path: Path, linear,
                                                                 recipe) -> None:
    src, tensors = linear
    report = compress(src, tmp_path / "o.safetensors", Recipe(recipe))
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    dense, metadata = load_all(tmp_path / "d.safetensors")
    assert set(dense) == set(tensors)
    assert metadata == {"format": "pt"}
    for name, original in tensors.items():
        assert dense[name].shape == original.shape and dense[name].dtype == original.dtype
    for row in report.rows:
        assert compare(tensors[row.name], dense[row.name]).rel_l2 == pytest.approx(
            row.error.rel_l2, rel=1e-6)


def test_pruned_only_is_smaller_in_sparse_bitmask_layout(tmp_path: Path, linear) -> None:
    src, tensors = linear
    report = compress(src, tmp_path / "o.safetensors", Recipe([Prune(sparsity=0.5)]))
    assert report.file_bytes_after < report.file_bytes_before
    stored, _ = load_all(tmp_path / "o.safetensors")
    assert stored["fc.shape"].tolist() == [48, 200]
    assert stored["fc.compressed"].shape == (48 * 200 // 2,)
    assert stored["fc.bitmask"].shape == (48, 25) and stored["fc.bitmask"].dtype == np.uint8
    mask = np.unpackbits(stored["fc.bitmask"], axis=-1, count=200, bitorder="little").astype(bool)
    assert stored["fc.row_offsets"].tolist() == (np.cumsum(mask.sum(1)) - mask.sum(1)).tolist()
    rebuilt = np.zeros((48, 200), np.float32)
    rebuilt[mask] = stored["fc.compressed"]
    w = tensors["fc.weight"]
    np.testing.assert_array_equal(rebuilt[mask], w[mask])
    row = next(r for r in report.rows if r.name == "fc.weight")
    # shape int64[2] + bitmask + kept fp32 values + row_offsets int64[48]
    assert row.bytes_after == 2 * 8 + 48 * 25 + 4800 * 4 + 48 * 8
    assert row.bytes_after < row.bytes_before


def test_bf16_weights_keep_their_dtype(tmp_path: Path) -> None:
    w = rng_weights(32, 128).astype(ml_dtypes.bfloat16)
    src = write_safetensors(tmp_path / "b.safetensors", {"l.weight": w})
    compress(src, tmp_path / "o.safetensors", Recipe([Quantize(bits=4, group_size=32)]))
    stored, _ = load_all(tmp_path / "o.safetensors")
    assert stored["l.weight_scale"].dtype == ml_dtypes.bfloat16  # the model's dtype, as CT expects
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    dense, _ = load_all(tmp_path / "d.safetensors")
    assert dense["l.weight"].dtype == ml_dtypes.bfloat16


def test_sample_transformer_int4_ratio(tmp_path: Path, samples: Path) -> None:
    report = compress(samples / "transformer.safetensors", tmp_path / "t.safetensors",
                      Recipe([Quantize(bits=4, group_size=32)]))
    assert report.file_bytes_after == (tmp_path / "t.safetensors").stat().st_size
    assert report.ratio <= 0.20
    assert len(report.rows) == 9
