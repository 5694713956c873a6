"""The compressed-tensors `quantization_config` of a model directory's config.json.

transformers and vLLM decide how to load a checkpoint from its config.json.
When every compressed tensor of a safetensors output is in one of
compressed-tensors' layouts (pack-quantized or float-quantized), the output's
config.json gets a `quantization_config` describing it; otherwise config.json
is copied unchanged (a reader that does not know the modelpress layouts
should not be told it can load them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from modelpress.core.errors import ModelWriteError

from modelpress.formats.atomic import atomic_path
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


def config_for(src: Path, output_model: Path) -> bytes:
    """The bytes of config.json for a compressed model: `src` with its quantization_config.

    `output_model` is the written model (a .safetensors file or an index).
    """
    raw = Path(src).read_bytes()
    output_model = Path(output_model)
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


def write_config(src: Path, dst: Path, output_model: Path) -> None:
    """Write config.json for a compressed model, atomically."""
    data = config_for(src, output_model)
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)
