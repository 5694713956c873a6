"""The compressed-tensors `quantization_config` of a model directory's config.json.

transformers and vLLM decide how to load a checkpoint from its config.json.
When every compressed tensor of a safetensors output is in one of
compressed-tensors' layouts (pack-quantized or float-quantized), the output's
config.json gets a `quantization_config` describing it; otherwise config.json
is copied unchanged (a reader that does not know the modelpress layouts
should not be told it can load them).

A model directory whose config.json names transformers classes
(`loads_in_transformers`) is compressed for those loaders (`for_loaders`,
`loader_form`):
its embeddings stay dense unless named, because transformers builds a
quantized module for every `targets` entry and an `Embedding` cannot take
compressed-tensors weights (it loses `.weight` and the load fails); and pruned
tensors keep their zeros in the dense or quantized layout instead of
sparse-bitmask, because compressed-tensors dropped its sparse formats after
0.14 (the release transformers 5 installs ignores `sparsity_config`, so a
sparse-bitmask tensor would load as random weights).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from modelpress.core.encoded import Encoded, Sparse
from modelpress.core.errors import ModelWriteError
from modelpress.core.recipe import Recipe
from modelpress.core.tensorinfo import TensorInfo

from modelpress.formats.atomic import atomic_path
from modelpress.formats.location import AnyPath, ObjectPath, location, read_bytes, storage
from modelpress.formats.safetensors.layout import part_names
from modelpress.formats.safetensors.sharded import ShardedStore, is_index
from modelpress.formats.safetensors.store import SafetensorsStore


_FORMATS = ("pack-quantized", "float-quantized")


def quantization_config(shapes: Mapping[str, tuple[int, ...]],
                        specs: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The compressed-tensors block for a checkpoint, or None if it does not apply.

    `shapes` holds every tensor of the model by its original name, `specs` the
    modelpress specs of the compressed ones. It applies when every compressed
    tensor is in one compressed-tensors layout: pack-quantized (int weights)
    or float-quantized (fp8-e4m3 weights with scales). One config group per
    distinct scheme (bits, type, symmetry, strategy, group size); `targets`
    names the exact modules quantized with it, so a quantized module of any
    class is described correctly; `ignore` lists the Linear-like modules (2-D
    `*.weight`) left unquantized.
    """
    # Tensors stored dense under their own names load as they are, like untouched ones.
    specs = {name: spec for name, spec in specs.items() if spec.get("layout") != "dense"}
    layouts = {spec.get("layout") for spec in specs.values()}
    if len(layouts) != 1 or not layouts <= set(_FORMATS):
        return None
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name in sorted(specs):
        groups.setdefault(_scheme(specs[name]), []).append(_module(name))
    config_groups = {}
    for i, (key, modules) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        bits, kind, symmetric, strategy, group_size = key
        config_groups[f"group_{i}"] = {
            "targets": modules,
            "weights": {"num_bits": bits, "type": kind, "symmetric": symmetric,
                        "strategy": strategy, "group_size": group_size, "dynamic": False},
            "input_activations": None, "output_activations": None}
    ignore = sorted(_module(n) for n, shape in shapes.items()
                    if n.endswith(".weight") and len(shape) == 2 and n not in specs)
    return {"quant_method": "compressed-tensors", "format": layouts.pop(),
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": ignore, "sparsity_config": {}}


def loads_in_transformers(config: AnyPath | None) -> bool:
    """True when a config.json names the model classes that transformers builds.

    `save_pretrained` writes `architectures`; a folder whose config lacks it
    (or is no JSON object) is not compressed for the loaders.
    """
    if config is None:
        return False
    try:
        data = json.loads(read_bytes(location(config)).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("architectures"), list)


def for_loaders(recipe: Recipe, tensors: Mapping[str, TensorInfo],
                min_elements: int) -> tuple[Recipe, list[str]]:
    """The recipe a model directory is compressed with, and the notes that say why.

    Each stage without `include` leaves out the embeddings it would select by
    default (see the module docstring); a stage that names tensors with
    `include` changes what it names.
    """
    embeddings = [name for name, info in tensors.items()
                  if info.sensitive == "embedding" and info.default_target(min_elements)]
    if not embeddings or all(stage.include for stage in recipe.stages):
        return recipe, []
    stages = [stage if stage.include else
              dataclasses.replace(stage, exclude=stage.exclude + tuple(embeddings))
              for stage in recipe.stages]
    note = (f"embeddings left dense ({', '.join(embeddings)}): transformers cannot load "
            "compressed-tensors weights into an Embedding module; name them with --include "
            "to compress them anyway (the output then loads only with modelpress decompress)")
    return Recipe(stages), [note]


def loader_form(encoded: Encoded) -> Encoded:
    """The tree a model directory stores: a pruned tensor without its sparse wrapper.

    Its values already hold exact zeros where the mask is off, so the
    decoded weights are the same; they are written dense, pack-quantized or
    float-quantized, which current loaders read.
    """
    return encoded.values if isinstance(encoded, Sparse) else encoded


def loader_notes(specs: Mapping[str, dict[str, Any]], pruned: bool) -> list[str]:
    """What a model directory's reader should know about how its tensors were stored."""
    notes = []
    if pruned:
        notes.append("pruned tensors are stored with their zeros in the dense or quantized "
                     "layout: compressed-tensors after 0.14 (what transformers 5 uses) reads no "
                     "sparse layout; compress the .safetensors file alone for the smaller "
                     "sparse-bitmask form")
    specs = {name: spec for name, spec in specs.items() if spec.get("layout") != "dense"}
    other = sorted(n for n, spec in specs.items() if spec.get("layout") not in _FORMATS)
    layouts = {spec.get("layout") for spec in specs.values()}
    if other or len(layouts) > 1:
        named = other or sorted(specs)
        notes.append(f"warning: transformers will not load this output: {len(named)} tensors "
                     f"({named[0]}, ...) are not in one compressed-tensors layout, so config.json "
                     "gets no quantization_config; `modelpress decompress` gives a loadable "
                     "dense copy")
    return notes


def _scheme(spec: dict[str, Any]) -> tuple[Any, ...]:
    """(num_bits, type, symmetric, strategy, group_size) of one tensor's spec."""
    if spec["layout"] == "float-quantized":
        return 8, "float", True, spec["granularity"], None
    group = spec.get("group_size") if spec["granularity"] == "group" else None
    return spec["bits"], "int", bool(spec["symmetric"]), spec["granularity"], group


def _module(tensor: str) -> str:
    return tensor[: -len(".weight")] if tensor.endswith(".weight") else tensor


def model_shapes(store: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of an opened safetensors store by its original name, from headers only."""
    parts = {p for spec in store.encodings.values() for p in part_names(spec)}
    shapes = {n: info.shape for n, info in store.tensors.items() if n not in parts}
    shapes.update({n: tuple(spec["shape"]) for n, spec in store.encodings.items()})
    return shapes


def config_for(src: AnyPath, output_model: AnyPath) -> bytes:
    """The bytes of config.json for a compressed model: `src` with its quantization_config.

    `output_model` is the written model (a .safetensors file or an index).
    """
    raw = read_bytes(location(src))
    output_model = location(output_model)
    if is_index(output_model):
        store: SafetensorsStore | ShardedStore = ShardedStore(output_model)
    elif output_model.suffix.lower() == ".safetensors":
        store = SafetensorsStore(output_model)
    else:  # an ONNX model: config.json is copied as it is
        return raw
    block = quantization_config(model_shapes(store), store.encodings)
    if block is None:
        return raw
    try:
        config = json.loads(raw.decode("utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelWriteError(f"{src}: not valid JSON ({exc}); cannot add the compressed-tensors "
                              "quantization_config (fix the file or remove it)") from None
    config["quantization_config"] = block
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


def write_config(src: AnyPath, dst: AnyPath, output_model: AnyPath) -> None:
    """Write config.json for a compressed model, atomically."""
    write_whole(dst, config_for(src, output_model))


def write_whole(dst: AnyPath, data: bytes) -> None:
    """Write a small file atomically: a local file, or an object in storage."""
    if isinstance(dst, ObjectPath):
        storage().write_bytes(dst, data)
        return
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)


def dense_config(src: AnyPath) -> bytes:
    """The bytes of config.json for a decompressed model: `src` without its
    compressed-tensors `quantization_config` (unchanged if it has none)."""
    raw = read_bytes(location(src))
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw  # not ours to fix: copied as it is
    block = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(block, dict) or block.get("quant_method") != "compressed-tensors":
        return raw
    del config["quantization_config"]
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


def write_dense_config(src: AnyPath, dst: AnyPath) -> None:
    """Write config.json for a decompressed model, atomically."""
    write_whole(dst, dense_config(src))
