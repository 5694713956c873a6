"""How encoded tensors are laid out as safetensors tensors, and read back.

Three layouts, each recorded per tensor in the header's `__metadata__`
(key "modelpress", see docs/FORMAT.md):

- "pack-quantized": compressed-tensors' layout, which vLLM and transformers
  read: `M.weight_packed` (int32, 32 // bits codes per word along the input
  dim), `M.weight_scale`, `M.weight_zero_point` (asymmetric only),
  `M.weight_shape`. Used for 2-D `*.weight` tensors at 4 or 8 bits.
- "sparse-bitmask": compressed-tensors' pruned layout (`M.shape`,
  `M.compressed`, `M.bitmask`, `M.row_offsets`) for pruned-only 2-D tensors.
- "float-quantized": compressed-tensors' fp8 layout, `M.weight` stored as
  F8_E4M3 `[out, in]` with `M.weight_scale` (`[out, 1]` per channel, `[1]`
  per tensor) in the model's float type; "scaled" is the same naming for
  every other low-precision float (F16, BF16, F8_E5M2, N-D, scales optional).
- "modelpress": any other tree (low-rank factors, codebooks, 2/3-bit codes,
  pruned + compressed), stored as parts named `<tensor>.mp_<part>` and
  described by a nested spec (bit-packed codes, bitmasks, values).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from modelpress.core.dtypes import FLOAT8_E4M3
from modelpress.core.encoded import (Dense, Encoded, LowRank, Palettized, Quantized, Scaled, Sparse, scale_shape)
from modelpress.core.errors import ModelReadError, ModelWriteError
from modelpress.core.quantize.scalecode import MultiplierCode, ScaleCode, base_shape
from modelpress.core.packing import (pack_bits, pack_int32, to_signed, to_unsigned, unpack_bits, unpack_int32)

from modelpress.formats.safetensors.header import DTYPES, dtype_code

Parts = list[tuple[str, np.ndarray]]
Getter = Callable[[str], np.ndarray]


def encode_tensor(name: str, encoded: Encoded, taken: set[str]) -> tuple[dict[str, Any], Parts]:
    """The spec and stored tensors for one encoded tensor, in the most compact layout.

    `taken` holds the names of the model's other tensors; a part may not reuse one.
    """
    spec, parts = _layout(name, encoded)
    for key, _ in parts:
        if key in taken:
            raise ModelWriteError(f"tensor {name!r}: cannot store its part {key!r}: a tensor of "
                                  "that name already exists in the model")
    return spec, parts


def check_part_names(names: list[str], parts: dict[str, list[str]]) -> None:
    """Refuse stored names that clash, as `encode_tensor` would have with all tensors known.

    `names` are the model's tensors in order; `parts` maps each encoded tensor
    to the names its layout stores. A part may not take the name of a tensor
    that stays as it is, nor of an earlier tensor's part. (A streaming writer
    learns which tensors are encoded only as they come, so it checks at the end.)
    """
    taken = {n for n in names if n not in parts}
    for name in names:
        if name not in parts:
            continue
        for key in parts[name]:
            if key in taken:
                raise ModelWriteError(f"tensor {name!r}: cannot store its part {key!r}: a tensor "
                                      "of that name already exists in the model")
        taken.update(parts[name])


def _layout(name: str, encoded: Encoded) -> tuple[dict[str, Any], Parts]:
    if isinstance(encoded, Sparse) and encoded.values.nbytes <= encoded.compact_nbytes:
        # Zeros stored densely are smaller than bitmask + kept values at this sparsity.
        return _layout(name, encoded.values)
    if _pack_quantized_fits(name, encoded):
        return _pack_quantized(name, encoded)
    if (isinstance(encoded, Sparse) and isinstance(encoded.values, Dense)
            and len(encoded.shape) == 2 and name.endswith(".weight")):
        return _sparse_bitmask(name, encoded)
    if isinstance(encoded, Dense):
        return ({"layout": "dense", "tensors": {"values": name}},
                [(name, _contiguous(encoded.array))])
    if isinstance(encoded, Scaled):
        return _scaled(name, encoded)
    parts: Parts = []
    node = _node_spec(name, encoded, None, parts)
    return {"layout": "modelpress", "node": node}, parts


def decode_tensor(spec: dict[str, Any], get: Getter) -> Encoded:
    """Rebuild the encoded tree from a spec and a getter of stored tensors."""
    layout = spec.get("layout")
    if layout == "pack-quantized":
        return _read_pack_quantized(spec, get)
    if layout == "sparse-bitmask":
        return _read_sparse_bitmask(spec, get)
    if layout == "dense":
        return Dense(get(spec["tensors"]["values"]))
    if layout in ("float-quantized", "scaled"):
        return _read_scaled(spec, get)
    if layout == "modelpress":
        return _read_node(spec["node"], get, None)
    raise ModelReadError(f"unknown modelpress layout {layout!r}; upgrade modelpress")


def part_names(spec: dict[str, Any]) -> list[str]:
    """Every stored tensor name a spec refers to."""
    names: list[str] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, str) and key in _NAME_KEYS:
            names.append(value)
    walk(spec)
    return names


_NAME_KEYS = {"packed", "scale", "zero_point", "shape", "compressed", "bitmask", "row_offsets",
              "codes", "mask", "values", "lut", "indices", "scale_codes", "scale_high",
              "scale_low", "zero_codes", "scale_multipliers", "scale_base"}


# -- compressed-tensors pack-quantized -----------------------------------------


def _pack_quantized_fits(name: str, encoded: Encoded) -> bool:
    q = encoded
    return (isinstance(q, Quantized) and len(q.shape) == 2 and name.endswith("weight")
            and q.bits in (4, 8) and q.channel_axis in (None, 0) and q.block_axis in (None, 1)
            and q.scale_code is None and q.zero_bits in (None, q.bits))


def _pack_quantized(name: str, q: Quantized) -> tuple[dict[str, Any], Parts]:
    prefix = name  # "M.weight" -> "M.weight_packed", as compressed-tensors names them
    rows, cols = q.shape
    if q.granularity == "tensor":
        scale = q.scale.reshape(1)
    else:
        scale = q.scale.reshape(rows, -1)
    parts: Parts = [
        (f"{prefix}_packed", pack_int32(to_unsigned(q.codes, q.bits), q.bits, axis=1)),
        (f"{prefix}_scale", _contiguous(scale)),
    ]
    tensors = {"packed": f"{prefix}_packed", "scale": f"{prefix}_scale"}
    if q.zero_point is not None:
        if q.granularity == "tensor":
            zp = q.zero_point.reshape(1).astype(np.int8)
        else:
            zp = pack_int32(to_unsigned(q.zero_point.reshape(rows, -1), q.bits), q.bits, axis=0)
        parts.append((f"{prefix}_zero_point", zp))
        tensors["zero_point"] = f"{prefix}_zero_point"
    parts.append((f"{prefix}_shape", np.array([rows, cols], dtype=np.int64)))
    tensors["shape"] = f"{prefix}_shape"
    spec = {"layout": "pack-quantized", "bits": q.bits, "symmetric": q.symmetric,
            "granularity": q.granularity, "group_size": q.group_size, "tensors": tensors}
    return spec, parts


def _read_pack_quantized(spec: dict[str, Any], get: Getter) -> Quantized:
    t, bits, granularity = spec["tensors"], spec["bits"], spec["granularity"]
    rows, cols = (int(v) for v in get(t["shape"]))
    codes = to_signed(unpack_int32(get(t["packed"]), bits, cols, axis=1), bits)
    scale = get(t["scale"])
    zp = None
    if "zero_point" in t:
        raw = get(t["zero_point"])
        if granularity == "tensor":
            zp = raw.astype(np.int8)
        else:
            zp = to_signed(unpack_int32(raw, bits, rows, axis=0), bits)
    if granularity == "tensor":
        scale, zp = scale.reshape(1, 1), None if zp is None else zp.reshape(1, 1)
    else:
        scale = scale.reshape(rows, -1)
        zp = None if zp is None else zp.reshape(rows, -1)
    return Quantized(codes=codes.reshape(rows, cols), scale=scale, zero_point=zp, bits=bits,
                     granularity=granularity,
                     channel_axis=0 if granularity == "channel" else None,
                     block_axis=1 if granularity == "group" else None,
                     group_size=spec.get("group_size"))


# -- compressed-tensors sparse-bitmask -----------------------------------------


def _sparse_bitmask(name: str, sparse: Sparse) -> tuple[dict[str, Any], Parts]:
    prefix = name[: -len(".weight")]
    mask, dense = sparse.mask, sparse.values.array
    per_row = mask.sum(axis=1)
    parts: Parts = [
        (f"{prefix}.shape", np.array(mask.shape, dtype=np.int64)),
        (f"{prefix}.compressed", _contiguous(dense[mask])),
        (f"{prefix}.bitmask", np.packbits(mask, axis=-1, bitorder="little")),
        (f"{prefix}.row_offsets", (np.cumsum(per_row) - per_row).astype(np.int64)),
    ]
    tensors = {"shape": parts[0][0], "compressed": parts[1][0], "bitmask": parts[2][0],
               "row_offsets": parts[3][0]}
    return {"layout": "sparse-bitmask", "pattern": sparse.pattern, "tensors": tensors}, parts


def _read_sparse_bitmask(spec: dict[str, Any], get: Getter) -> Sparse:
    t = spec["tensors"]
    shape = tuple(int(v) for v in get(t["shape"]))
    mask = np.unpackbits(get(t["bitmask"]), axis=-1, count=shape[-1],
                         bitorder="little").astype(bool).reshape(shape)
    kept = get(t["compressed"])
    dense = np.zeros(shape, dtype=kept.dtype)
    dense[mask] = kept
    return Sparse(mask, Dense(dense), spec.get("pattern", "unstructured"))


# -- low-precision floats (compressed-tensors float-quantized) ----------------


def _scaled(name: str, scaled: Scaled) -> tuple[dict[str, Any], Parts]:
    """Values in their native dtype under the tensor's own name, `<name>_scale` beside."""
    parts: Parts = [(name, _contiguous(scaled.values))]
    tensors = {"values": name}
    conventional = (scaled.dtype == FLOAT8_E4M3 and scaled.values.ndim == 2
                    and name.endswith("weight") and scaled.channel_axis in (None, 0))
    if scaled.scale is not None:
        scale = scaled.scale.reshape(1) if scaled.channel_axis is None else scaled.scale
        parts.append((f"{name}_scale", _contiguous(scale)))
        tensors["scale"] = f"{name}_scale"
    spec = {"layout": "float-quantized" if conventional and scaled.scale is not None else "scaled",
            "granularity": scaled.granularity, "channel_axis": scaled.channel_axis,
            "tensors": tensors}
    return spec, parts


def _read_scaled(spec: dict[str, Any], get: Getter) -> Scaled:
    values = get(spec["tensors"]["values"])
    if "scale" not in spec["tensors"]:
        return Scaled(values)
    return Scaled(values, _scale_shape(get(spec["tensors"]["scale"]), values.shape,
                                       spec["channel_axis"]), spec["channel_axis"])


def _scale_shape(scale: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    full = [1] * len(shape)
    if axis is not None:
        full[axis] = shape[axis]
    return scale.reshape(full)


# -- modelpress generic tree ---------------------------------------------------


def _node_spec(name: str, encoded: Encoded, keep: np.ndarray | None, parts: Parts,
               prefix: str = "") -> dict:
    """Spec of one node; with `keep`, only the elements where keep is True are stored.

    Parts are named `<name>.mp_<prefix><part>` (the prefix tells factors apart).
    """
    def add(part: str, array: np.ndarray) -> str:
        return _add(parts, name, prefix + part, array)

    if isinstance(encoded, LowRank):
        return {"type": "lowrank", "shape": list(encoded.shape),
                "left": _node_spec(name, encoded.left, None, parts, prefix + "left_"),
                "right": _node_spec(name, encoded.right, None, parts, prefix + "right_")}
    if isinstance(encoded, Scaled):
        values = encoded.values if keep is None else encoded.values[keep]
        spec = {"type": "scaled", "dtype": dtype_code(encoded.dtype), "shape": list(encoded.shape),
                "channel_axis": encoded.channel_axis,
                "values": add("values", _contiguous(values))}
        if encoded.scale is not None:
            spec["scale"] = add("scale", _contiguous(encoded.scale))
        return spec
    if isinstance(encoded, Palettized):
        indices = encoded.indices if keep is None else encoded.indices[keep]
        return {"type": "palettized", "shape": list(encoded.shape), "bits": encoded.bits,
                "count": int(indices.size), "channel_axis": encoded.channel_axis,
                "zero_index": encoded.zero_index,
                "lut": add("lut", _contiguous(encoded.lut)),
                "indices": add("indices", pack_bits(indices, encoded.bits))}
    if isinstance(encoded, Sparse):
        compact = encoded.compact_nbytes < encoded.values.nbytes
        spec = {"type": "sparse", "pattern": encoded.pattern, "shape": list(encoded.shape),
                "compact": compact}
        if compact:
            spec["mask"] = add("mask", np.packbits(encoded.mask.reshape(-1), bitorder="little"))
        inner_keep = encoded.mask if compact else keep
        spec["values"] = _node_spec(name, encoded.values, inner_keep, parts, prefix)
        return spec
    if isinstance(encoded, Quantized):
        codes = encoded.codes if keep is None else encoded.codes[keep]
        spec = {"type": "quantized", "bits": encoded.bits, "granularity": encoded.granularity,
                "channel_axis": encoded.channel_axis, "block_axis": encoded.block_axis,
                "group_size": encoded.group_size, "shape": list(encoded.shape),
                "count": int(codes.size),
                "codes": add("codes", pack_bits(to_unsigned(codes, encoded.bits), encoded.bits))}
        code = encoded.scale_code
        if code is None:
            spec["scale"] = add("scale", _contiguous(encoded.scale))
        elif isinstance(code, MultiplierCode):
            spec.update(super_block=encoded.super_block, scale_multipliers=add(
                "scale_multipliers", pack_bits(code.multipliers, code.bits)),
                scale_base=add("scale_base", _contiguous(code.base)))
        else:
            spec.update(scale_bits=code.bits,
                        scale_codes=add("scale_codes", pack_bits(code.codes, code.bits)),
                        scale_high=add("scale_high", _contiguous(code.high)),
                        scale_low=add("scale_low", _contiguous(code.low)))
        if encoded.zero_point is not None and encoded.zero_bits is not None:
            width = encoded.zero_bits
            stored = (encoded.zero_point.astype(np.int16) + (1 << (width - 1))).astype(np.uint8)
            spec.update(zero_bits=width, zero_codes=add("zero_codes", pack_bits(stored, width)))
        elif encoded.zero_point is not None:
            spec["zero_point"] = add("zero_point", _contiguous(encoded.zero_point))
        return spec
    if isinstance(encoded, Dense):
        values = encoded.array if keep is None else encoded.array[keep]
        return {"type": "dense", "shape": list(encoded.shape),
                "values": add("values", _contiguous(values))}
    raise ValueError(f"no safetensors layout for {type(encoded).__name__}")


def _read_node(spec: dict[str, Any], get: Getter, keep: np.ndarray | None) -> Encoded:
    kind, shape = spec.get("type"), tuple(spec.get("shape", ()))
    if kind == "sparse":
        mask = None
        if spec["compact"]:
            mask = np.unpackbits(get(spec["mask"]), count=math.prod(shape),
                                 bitorder="little").astype(bool).reshape(shape)
        values = _read_node(spec["values"], get, mask if mask is not None else keep)
        if mask is None:
            mask = values.decode() != 0
        return Sparse(mask, values, spec.get("pattern", "unstructured"))
    if kind == "quantized":
        bits = spec["bits"]
        stored = to_signed(unpack_bits(get(spec["codes"]), bits, spec["count"]), bits)
        grain = (spec["granularity"], spec["channel_axis"], spec["block_axis"], spec["group_size"])
        per_group = scale_shape(shape, *grain)
        groups = math.prod(per_group)
        code, zero_bits = None, spec.get("zero_bits")
        if "scale_multipliers" in spec:
            axis, ratio = spec["block_axis"], spec["super_block"] // spec["group_size"]
            code = MultiplierCode(
                unpack_bits(get(spec["scale_multipliers"]), MultiplierCode.bits,
                            groups).reshape(per_group),
                get(spec["scale_base"]).reshape(base_shape(per_group, axis, ratio)), axis, ratio)
            scale = code.decode()
        elif "scale_codes" in spec:
            sb = spec["scale_bits"]
            code = ScaleCode(unpack_bits(get(spec["scale_codes"]), sb, groups).reshape(per_group),
                             get(spec["scale_high"]), get(spec["scale_low"]), sb)
            scale = code.decode()
        else:
            scale = get(spec["scale"])
        zp = get(spec["zero_point"]) if "zero_point" in spec else None
        if "zero_codes" in spec:
            zp = to_signed(unpack_bits(get(spec["zero_codes"]), zero_bits, groups),
                           zero_bits).reshape(per_group)
        q = Quantized(np.zeros(shape, np.int8), scale, zp, bits, *grain, scale_code=code,
                      zero_bits=zero_bits)
        if keep is None:
            return q.with_codes(stored.reshape(shape))
        codes = q.zero_codes().copy()
        codes[keep] = stored
        return q.with_codes(codes)
    if kind == "dense":
        return Dense(_scatter(get(spec["values"]), shape, keep))
    if kind == "scaled":
        values = _scatter(get(spec["values"]).view(DTYPES[spec["dtype"]]), shape, keep)
        if "scale" not in spec:
            return Scaled(values)
        return Scaled(values, get(spec["scale"]), spec["channel_axis"])
    if kind == "palettized":
        stored = unpack_bits(get(spec["indices"]), spec["bits"], spec["count"])
        zero = spec.get("zero_index") or 0
        return Palettized(get(spec["lut"]), _scatter(stored, shape, keep, fill=zero),
                          spec["channel_axis"], spec.get("zero_index"))
    if kind == "lowrank":
        return LowRank(_read_node(spec["left"], get, None), _read_node(spec["right"], get, None))
    raise ModelReadError(f"unknown modelpress node type {kind!r}; upgrade modelpress")


def _contiguous(array: np.ndarray) -> np.ndarray:
    """A C-ordered array of the same shape (np.ascontiguousarray turns a scalar into 1-D)."""
    return np.require(array, requirements="C")


def _scatter(values: np.ndarray, shape: tuple[int, ...], keep: np.ndarray | None,
             fill: int = 0) -> np.ndarray:
    """Stored values back at their positions: all of them, or only where `keep` is True."""
    if keep is None:
        return values.reshape(shape)
    full = np.full(shape, fill, dtype=values.dtype)
    full[keep] = values
    return full


def _add(parts: Parts, name: str, part: str, array: np.ndarray) -> str:
    key = f"{name}.mp_{part}"
    suffix = 2
    while any(key == existing for existing, _ in parts):
        key = f"{name}.mp_{part}{suffix}"
        suffix += 1
    parts.append((key, array))
    return key
