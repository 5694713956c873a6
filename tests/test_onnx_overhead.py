"""What an ONNX output spends besides weights (metadata, call attributes) and the backup budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from modelpress import ModelReadError
from modelpress.formats import open_model
from modelpress.formats.onnx import meta as onnx_meta
from modelpress.formats.onnx.meta import decode_doc, encode_doc

from conftest import matmul_model, rng_weights, run_cli, sha256


def _compress(tmp_path: Path, src: Path, *stage: str) -> Path:
    out = tmp_path / "out.onnx"
    result = run_cli(["compress", src, "-o", out, "--no-eval", *stage])
    assert result.exit_code == 0, result.output
    return out


def test_sensitive_share_of_the_sample_transformer(samples: Path) -> None:
    tensors = open_model(samples / "transformer.onnx").tensors
    sensitive = {n: t.sensitive for n, t in tensors.items() if t.sensitive}
    assert sensitive == {"embed_tokens.weight": "embedding", "embed_positions.weight": "embedding",
                         "lm_head.weight": "head"}
    weights = sum(t.size for t in tensors.values() if t.weight_like)
    share = sum(tensors[n].size for n in sensitive) / weights
    assert share == pytest.approx((32768 + 4096 + 32768) / 118784)
    assert all(tensors[n].sensitive_share == pytest.approx(share) for n in sensitive)
    assert tensors["layers.0.mlp.fc1.weight"].sensitive_share is None


def test_a_model_whose_every_weight_is_the_head_gets_no_backup(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "head.onnx", {"w": rng_weights(128, 64)})
    assert open_model(src).tensors["w"].sensitive is None
    out = _compress(tmp_path, src, "quantize", "--bits", "4")
    spec = decode_doc(onnx.load(str(out)).metadata_props[0].value)["tensors"]["w"]
    assert spec["bits"] == 4


def test_backup_is_budgeted_on_the_transformer(tmp_path: Path, samples: Path) -> None:
    out = _compress(tmp_path, samples / "transformer.onnx", "quantize", "--bits", "4")
    specs = decode_doc(onnx.load(str(out)).metadata_props[0].value)["tensors"]
    bits = {name: spec["bits"] for name, spec in specs.items()}
    # 58% of the weights are sensitive: +2 bits would add 1.17 bits per weight, +1 adds 0.58.
    assert bits.pop("embed_tokens.weight") == bits.pop("lm_head.weight") == 5
    assert bits.pop("embed_positions.weight") == 5
    assert set(bits.values()) == {4}


def test_metadata_is_compressed_and_round_trips(tmp_path: Path, samples: Path) -> None:
    out = _compress(tmp_path, samples / "transformer.onnx", "quantize", "--bits", "4")
    value = onnx.load(str(out)).metadata_props[0].value
    doc = decode_doc(value)
    plain = json.dumps(doc, separators=(",", ":"))
    assert value.startswith("zlib:") and len(value) < len(plain) / 4
    assert decode_doc(encode_doc(doc)) == doc


def test_plain_json_metadata_from_earlier_versions_is_still_read(tmp_path: Path,
                                                                 samples: Path) -> None:
    out = _compress(tmp_path, samples / "transformer.onnx", "quantize", "--bits", "4")
    model = onnx.load(str(out))
    model.metadata_props[0].value = json.dumps(decode_doc(model.metadata_props[0].value))
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    new_dense, old_dense = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run_cli(["decompress", out, "-o", new_dense]).exit_code == 0
    assert run_cli(["decompress", old, "-o", old_dense]).exit_code == 0
    a, b = open_model(new_dense), open_model(old_dense)
    for name in a.tensors:
        np.testing.assert_array_equal(a.read(name), b.read(name))


@pytest.mark.parametrize("value", ["zlib:not base64!", "zlib:" + "QUFB", "zlib:",
                                   encode_doc({"x": 1})[:-8]])
def test_undecodable_compressed_metadata_is_one_line(tmp_path: Path, samples: Path,
                                                     value: str) -> None:
    out = _compress(tmp_path, samples / "mlp.onnx", "quantize", "--bits", "8")
    model = onnx.load(str(out))
    model.metadata_props[0].value = value
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    before = sha256(bad)
    with pytest.raises(ModelReadError, match=r"bad.onnx: corrupt modelpress metadata"):
        open_model(bad)
    result = run_cli(["decompress", bad, "-o", tmp_path / "d.onnx"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert sha256(bad) == before and not (tmp_path / "d.onnx").exists()


def test_metadata_that_inflates_past_the_limit_is_refused(monkeypatch) -> None:
    value = encode_doc({"pad": "x" * 5000})
    monkeypatch.setattr(onnx_meta, "MAX_TEXT", 1000)
    with pytest.raises(ValueError, match="larger than"):
        decode_doc(value)


def test_decode_calls_carry_each_shape_once(tmp_path: Path, samples: Path) -> None:
    out = _compress(tmp_path, samples / "transformer.onnx", "quantize", "--bits", "4",
                    "--group-size", "32")
    calls = [n for n in onnx.load(str(out)).graph.node if n.domain == "modelpress"]
    assert len(calls) == 9
    for call in calls:
        values = [tuple(a.ints) for a in call.attribute]
        assert len(values) == len(set(values)), call.name
