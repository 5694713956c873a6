"""Model directories for `inspect` and `decompress`: a folder of models, configs and files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from modelpress.app.api import decompress
from modelpress.core.errors import ModelReadError, ModelWriteError
from modelpress.core.store import WriteResult
from modelpress.formats import find_index
from modelpress.formats.discover import discover
from modelpress.formats.outputs import copy_file
from modelpress.formats.safetensors.ct_config import write_dense_config


@dataclass
class DirectoryResult:
    """What decompressing a folder wrote: each model's result and the files copied."""

    models: dict[str, WriteResult] = field(default_factory=dict)   # by path relative to the folder
    copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def model_in(path: str | os.PathLike) -> Path:
    """The model a path names: the path itself, or a folder's one model.

    A folder with a sharded checkpoint's index is that checkpoint; a folder
    with exactly one model (a Hugging Face model directory's
    `model.safetensors`, or one .onnx file) is that model.
    """

    path = Path(path)
    if not path.is_dir() or find_index(path) is not None:
        return path
    models = [m for m in discover([path]).models if m.rel.parent.name == ""]
    if len(models) == 1:
        return models[0].src
    found = ", ".join(str(m.rel) for m in models) or "none"
    raise ModelReadError(f"{path}: a folder holding {len(models)} models at its top level "
                         f"({found}); name one of them")


def decompress_directory(src: str | os.PathLike, dst: str | os.PathLike) -> DirectoryResult:
    """Decompress every model of the folder `src` into the folder `dst`, a dense model directory.

    Each model keeps its relative path; its config.json loses the
    compressed-tensors `quantization_config`, so transformers loads the
    output as a dense model; every other file is copied.
    """

    src, dst = Path(src), Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ModelWriteError(f"{dst}: exists and is not a folder; decompressing the folder {src} "
                              "writes a folder (give a new or existing folder)")
    if Path(os.path.abspath(dst)) == Path(os.path.abspath(src)):
        raise ModelWriteError(f"{dst}: is the input folder; give another output folder")
    found = discover([src], exclude=dst)
    if found.refused:
        first = found.refused[0]
        raise ModelReadError(f"{src / first.rel}: {first.reason}")
    result = DirectoryResult()
    for model in found.models:
        if model.problem:
            raise ModelReadError(f"{model.src}: {model.problem}")
        target = dst / model.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        written = decompress(model.src, target)
        result.models[str(model.rel)] = written
        result.notes.extend(written.notes)
        if model.config is not None:
            write_dense_config(model.config, target.parent / model.config.name)
            result.copied.append(str(model.rel.parent / model.config.name))
    for other in found.others:
        target = dst / other.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(other.src, target)
        result.copied.append(str(other.rel))
    return result
