"""Corpus entries: sharded safetensors checkpoints (`*.safetensors.index.json` + shards)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from corpus import entry, st_file, weights

INDEX = "model.safetensors.index.json"


def sharded(folder: Path, shards: dict[str, dict[str, np.ndarray]],
            weight_map: dict[str, str] | None = None) -> Path:
    """Shard files plus an index; `weight_map` overrides the one the shards imply."""
    implied = {}
    for shard, tensors in shards.items():
        st_file(folder / shard, tensors)
        implied.update({name: shard for name in tensors})
    index = folder / INDEX
    index.write_text(json.dumps({"metadata": {"total_size": 0},
                                 "weight_map": implied if weight_map is None else weight_map}))
    return index


def _two_shards() -> dict[str, dict[str, np.ndarray]]:
    return {"model-00001-of-00002.safetensors": {"a.weight": weights(64, 64, seed=1),
                                                 "a.bias": weights(64, seed=2)},
            "model-00002-of-00002.safetensors": {"b.weight": weights(64, 96, seed=3)}}


@entry("sharded-good")
def _(d):
    return {"path": sharded(d, _two_shards())}


@entry("sharded-missing-shard")
def _(d):
    index = sharded(d, _two_shards())
    (d / "model-00002-of-00002.safetensors").unlink()
    return {"path": index, "read_error": "shard 'model-00002-of-00002.safetensors' (holding "
                                         "'b.weight') is missing"}


@entry("sharded-shard-traversal")
def _(d):
    shards = _two_shards()
    (d.parent / "elsewhere.safetensors").write_bytes(b"")
    weight_map = {"a.weight": "../elsewhere.safetensors", "a.bias": "../elsewhere.safetensors",
                  "b.weight": "model-00002-of-00002.safetensors"}
    return {"path": sharded(d, shards, weight_map), "read_error": "is not a plain file name"}


@entry("sharded-shard-links-outside")
def _(d):
    index = sharded(d, _two_shards())
    shard = d / "model-00002-of-00002.safetensors"
    outside = d.parent / "outside-shard.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    return {"path": index, "read_error": "outside the index's folder"}


@entry("sharded-index-not-json")
def _(d):
    index = sharded(d, _two_shards())
    index.write_text('{"weight_map": {"a.weight": ')
    return {"path": index, "read_error": "not a valid safetensors index"}


@entry("sharded-index-nested-100k-deep")
def _(d):
    index = sharded(d, _two_shards())
    index.write_text('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return {"path": index, "read_error": "nested too deeply"}


@entry("sharded-index-duplicate-tensor")
def _(d):
    index = sharded(d, _two_shards())
    text = index.read_text()
    index.write_text(text.replace('"a.weight": ', '"a.weight": "model-00002-of-00002.safetensors", '
                                  '"a.weight": ', 1))
    return {"path": index, "read_error": "key 'a.weight' appears more than once"}


@entry("sharded-index-without-weight-map")
def _(d):
    index = sharded(d, _two_shards())
    index.write_text(json.dumps({"metadata": {}}))
    return {"path": index, "read_error": "needs a 'weight_map'"}


@entry("sharded-index-lists-a-missing-tensor")
def _(d):
    weight_map = {"a.weight": "model-00001-of-00002.safetensors",
                  "a.bias": "model-00001-of-00002.safetensors",
                  "b.weight": "model-00002-of-00002.safetensors",
                  "ghost.weight": "model-00002-of-00002.safetensors"}
    return {"path": sharded(d, _two_shards(), weight_map),
            "read_error": "tensor 'ghost.weight' is listed in the index but missing"}


@entry("sharded-index-misplaces-a-tensor")
def _(d):
    weight_map = {"a.weight": "model-00002-of-00002.safetensors",
                  "a.bias": "model-00001-of-00002.safetensors",
                  "b.weight": "model-00002-of-00002.safetensors"}
    return {"path": sharded(d, _two_shards(), weight_map), "read_error": "inconsistent"}


@entry("sharded-truncated-shard")
def _(d):
    index = sharded(d, _two_shards())
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return {"path": index, "read_error": "truncated safetensors file"}


@entry("sharded-nan-in-a-shard")
def _(d):
    shards = _two_shards()
    shards["model-00002-of-00002.safetensors"]["b.weight"][5, 5] = np.nan
    return {"path": sharded(d, shards), "compress_error": "tensor 'b.weight' has 1 NaN/Inf"}
