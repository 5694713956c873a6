"""Hugging Face model directories: compressed outputs load in transformers as they are.

A tiny BERT (random weights, real config and tokenizer files, nothing from a
hub) is compressed with each recipe modelpress writes in a compressed-tensors
layout; `AutoModel.from_pretrained` must load every output with no weight
left unloaded, and the weights it ends up with must equal the dense model
that `modelpress decompress` gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from modelpress.core.encoded import Dense, Quantized, Sparse
from modelpress.formats.safetensors.ct_config import dense_config, loader_form

from conftest import run_cli

RECIPES = {
    "int8": ["quantize", "--bits", "8"],
    "int4-g128": ["quantize", "--bits", "4", "--group-size", "128"],
    "int4-g32": ["quantize", "--bits", "4", "--group-size", "32"],
    "fp8": ["cast", "--dtype", "fp8-e4m3"],
    "prune50": ["prune", "--sparsity", "0.5"],
    "prune24-int4": ["prune", "--pattern", "2:4", "quantize", "--bits", "4"],
}
EMBEDDINGS = ["embeddings.position_embeddings.weight", "embeddings.word_embeddings.weight"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT-style model directory: config.json, model.safetensors, tokenizer files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask a hub
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    folder = tmp_path_factory.mktemp("hf") / "bert"
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=256,
                                     max_position_embeddings=64)
    transformers.BertModel(config).eval().save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(507)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def _load(folder: Path):  # -> (model, loading info)
    from transformers import AutoModel
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def _hidden(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.numpy().ravel()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", list(RECIPES))
def test_compressed_directory_loads_in_transformers(model_dir: Path, tmp_path: Path,
                                                    name: str) -> None:
    import torch
    out, dense = tmp_path / "out", tmp_path / "dense"
    result = run_cli(["compress", model_dir, "-o", out, "--jobs", "1", *RECIPES[name]])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert "note: model.safetensors: embeddings left dense" in result.output
    result = run_cli(["decompress", out, "-o", dense])
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())

    compressed, info = _load(out)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert not info["mismatched_keys"]
    restored, info = _load(dense)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    original, _ = _load(model_dir)
    ids = torch.randint(5, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    # A compressed-tensors model holds its packed form until its first forward pass.
    hidden = _hidden(compressed, ids)
    weights = dict(compressed.state_dict())
    changed = 0
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
        changed += not torch.equal(value, original.state_dict()[key])
    assert changed >= 12  # every Linear weight of the encoder changed
    for key in EMBEDDINGS:
        assert torch.equal(weights[key], original.state_dict()[key])

    cosine = _cosine(hidden, _hidden(original, ids))
    assert cosine == pytest.approx(_cosine(_hidden(restored, ids), _hidden(original, ids)),
                                   abs=1e-6)
    if name == "int8":
        assert cosine >= 0.999


def test_config_names_quantized_modules_and_leaves_embeddings_out(model_dir: Path,
                                                                  tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    assert run_cli(["compress", model_dir, "-o", out, "-q", *RECIPES["int4-g32"]]).exit_code == 0
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = block["config_groups"].values()
    assert group["weights"]["group_size"] == 32 and group["weights"]["num_bits"] == 4
    assert "embeddings.word_embeddings" in block["ignore"]
    assert not any("embeddings" in t for t in group["targets"])
    assert len(group["targets"]) == 13  # 6 Linear per layer, 2 layers, and the pooler


def test_pruned_directory_says_how_zeros_are_stored(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    result = run_cli(["compress", model_dir, "-o", out, *RECIPES["prune24-int4"]])
    assert result.exit_code == 0, result.output
    assert "note: model.safetensors: pruned tensors are stored with their zeros" in result.output
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["format"] == "pack-quantized"


def test_included_embeddings_are_compressed_as_asked(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    result = run_cli(["compress", model_dir, "-o", out, "quantize", "--bits", "8",
                      "--include", "*word_embeddings*"])
    assert result.exit_code == 0, result.output
    assert "embeddings left dense" not in result.output
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["config_groups"]["group_0"]["targets"] == ["embeddings.word_embeddings"]


def test_inspect_and_decompress_take_the_directory(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    assert run_cli(["compress", model_dir, "-o", out, "-q", *RECIPES["int8"]]).exit_code == 0
    result = run_cli(["inspect", out, "--format", "json"])
    assert result.exit_code == 0, result.output
    names = [row["name"] for row in json.loads(result.output)["tensors"]]
    from safetensors import safe_open
    with safe_open(str(model_dir / "model.safetensors"), framework="np") as f:
        assert sorted(names) == sorted(f.keys())
    dense = tmp_path / "dense"
    result = run_cli(["decompress", out, "-o", dense])
    assert result.exit_code == 0, result.output
    assert f"{dense / 'model.safetensors'}: " in result.output
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (dense / name).read_bytes() == (model_dir / name).read_bytes()
    config = json.loads((dense / "config.json").read_text())
    assert config == json.loads((model_dir / "config.json").read_text())


# -- without torch --------------------------------------------------------------


def test_dense_config_drops_only_compressed_tensors_blocks(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_bytes(b'{"a": 1,\n "quantization_config": {"quant_method": "bitsandbytes"}}')
    assert dense_config(plain) == plain.read_bytes()
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"a": 1, "quantization_config": {
        "quant_method": "compressed-tensors"}, "b": [2]}))
    assert json.loads(dense_config(ours)) == {"a": 1, "b": [2]}
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"{not json")
    assert dense_config(broken) == b"{not json"


def test_loader_form_keeps_pruned_values_with_their_zeros() -> None:
    mask = np.array([[True, False], [False, True]])
    values = Dense(np.array([[1.5, 0.0], [0.0, -2.0]], dtype=np.float32))
    pruned = Sparse(mask, values)
    assert loader_form(pruned) is values
    np.testing.assert_array_equal(loader_form(pruned).decode(), pruned.decode())
    assert loader_form(values) is values
    assert not isinstance(loader_form(values), (Sparse, Quantized))


def test_a_sharded_directory_decompresses_to_a_dense_directory(tmp_path: Path) -> None:
    from tree_helpers import sample_tensors, sharded_checkpoint

    from modelpress.formats import open_model
    folder = tmp_path / "llm"
    sharded_checkpoint(folder)
    config = {"architectures": ["ToyModel"], "model_type": "toy"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text("{}")
    out, dense = tmp_path / "out", tmp_path / "dense"
    assert run_cli(["compress", folder, "-o", out, "-q", "--jobs", "1", "quantize", "--bits",
                    "4"]).exit_code == 0
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    result = run_cli(["inspect", out, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert sorted(r["name"] for r in json.loads(result.output)["tensors"]) == sorted(
        sample_tensors())
    result = run_cli(["decompress", out, "-o", dense])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dense.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert json.loads((dense / "config.json").read_text()) == config
    assert (dense / "tokenizer.json").read_text() == "{}"
    restored = open_model(dense)
    assert not restored.encodings
    for name, array in sample_tensors().items():
        assert restored.read(name).shape == array.shape


def test_decompress_refuses_a_file_as_the_output_of_a_folder(tmp_path: Path) -> None:
    from tree_helpers import sharded_checkpoint
    sharded_checkpoint(tmp_path / "llm")
    (tmp_path / "file").write_text("x")
    result = run_cli(["decompress", tmp_path / "llm", "-o", tmp_path / "file"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path / 'file'}: exists and is not a folder; decompressing the folder "
        f"{tmp_path / 'llm'} writes a folder (give a new or existing folder)")
