"""Model trees for the batch tests, built from the sample models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from safetensors import safe_open
from safetensors.numpy import save_file

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def sample_tensors(name: str = "transformer") -> dict[str, np.ndarray]:
    """Every tensor of a sample safetensors file, in file order."""
    with safe_open(str(SAMPLES / f"{name}.safetensors"), framework="np") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def sharded_checkpoint(folder: Path, shards: int = 3, name: str = "transformer") -> Path:
    """A Hugging Face style sharded checkpoint of a sample model; returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = sample_tensors(name)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(a.nbytes for a in tensors.values())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                indent=2))
    return index


def onnx_with_external_data(path: Path, name: str = "transformer") -> Path:
    """A sample ONNX model saved with every initializer in one external-data file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=0)
    return path


def acceptance_tree(root: Path, corrupt: bool = True) -> Path:
    """A model directory (3 shards, config.json, tokenizer.json), three ONNX files (one
    with external data), a README and, if asked, one corrupt ONNX file."""
    llm = root / "llm"
    sharded_checkpoint(llm)
    (llm / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 64},
                                                indent=2))
    (llm / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    vision = root / "vision"
    vision.mkdir(parents=True)
    shutil.copy(SAMPLES / "mlp.onnx", vision / "mlp.onnx")
    shutil.copy(SAMPLES / "cnn.onnx", vision / "cnn.onnx")
    onnx_with_external_data(root / "text" / "transformer.onnx")
    (root / "README.md").write_text("models\n")
    if corrupt:
        (root / "vision" / "broken.onnx").write_bytes(b"\x08\x07 this is no protobuf " * 40)
    return root


def tree_files(root: Path) -> dict[str, bytes]:
    """Every regular, non-hidden file under root, by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}
