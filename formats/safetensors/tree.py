"""The "modelpress" safetensors layout: any encoded tree (low-rank factors, codebooks,
2/3-bit codes, pruned + compressed) stored as parts named `<tensor>.mp_<part>` and
described by a nested spec (bit-packed codes, bitmasks, values); see `layout`."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from modelpress.core.encoded import Dense, Encoded, LowRank, Palettized, Quantized, Scaled, Sparse, scale_shape
from modelpress.core.errors import ModelReadError
from modelpress.core.packing import pack_bits, to_signed, to_unsigned, unpack_bits
from modelpress.core.scalecode import MultiplierCode, ScaleCode, base_shape

from modelpress.formats.safetensors.header import DTYPES, dtype_code

Parts = list[tuple[str, np.ndarray]]
Getter = Callable[[str], np.ndarray]


def node_spec(name: str, encoded: Encoded, keep: np.ndarray | None, parts: Parts,
               prefix: str = "") -> dict:
    """Spec of one node; with `keep`, only the elements where keep is True are stored.

    Parts are named `<name>.mp_<prefix><part>` (the prefix tells factors apart).
    """
    def add(part: str, array: np.ndarray) -> str:
        return _add(parts, name, prefix + part, array)

    if isinstance(encoded, LowRank):
        return {"type": "lowrank", "shape": list(encoded.shape),
                "left": node_spec(name, encoded.left, None, parts, prefix + "left_"),
                "right": node_spec(name, encoded.right, None, parts, prefix + "right_")}
    if isinstance(encoded, Scaled):
        values = encoded.values if keep is None else encoded.values[keep]
        spec = {"type": "scaled", "dtype": dtype_code(encoded.dtype), "shape": list(encoded.shape),
                "channel_axis": encoded.channel_axis,
                "values": add("values", contiguous(values))}
        if encoded.scale is not None:
            spec["scale"] = add("scale", contiguous(encoded.scale))
        return spec
    if isinstance(encoded, Palettized):
        indices = encoded.indices if keep is None else encoded.indices[keep]
        return {"type": "palettized", "shape": list(encoded.shape), "bits": encoded.bits,
                "count": int(indices.size), "channel_axis": encoded.channel_axis,
                "zero_index": encoded.zero_index,
                "lut": add("lut", contiguous(encoded.lut)),
                "indices": add("indices", pack_bits(indices, encoded.bits))}
    if isinstance(encoded, Sparse):
        compact = encoded.compact_nbytes < encoded.values.nbytes
        spec = {"type": "sparse", "pattern": encoded.pattern, "shape": list(encoded.shape),
                "compact": compact}
        if compact:
            spec["mask"] = add("mask", np.packbits(encoded.mask.reshape(-1), bitorder="little"))
        inner_keep = encoded.mask if compact else keep
        spec["values"] = node_spec(name, encoded.values, inner_keep, parts, prefix)
        return spec
    if isinstance(encoded, Quantized):
        codes = encoded.codes if keep is None else encoded.codes[keep]
        spec = {"type": "quantized", "bits": encoded.bits, "granularity": encoded.granularity,
                "channel_axis": encoded.channel_axis, "block_axis": encoded.block_axis,
                "group_size": encoded.group_size, "shape": list(encoded.shape),
                "count": int(codes.size),
                "codes": add("codes", pack_bits(to_unsigned(codes, encoded.bits), encoded.bits))}
        if encoded.block_span > 1:
            spec["block_span"] = encoded.block_span
        code = encoded.scale_code
        if code is None:
            spec["scale"] = add("scale", contiguous(encoded.scale))
        elif isinstance(code, MultiplierCode):
            spec.update(super_block=encoded.super_block, scale_multipliers=add(
                "scale_multipliers", pack_bits(code.multipliers, code.bits)),
                scale_base=add("scale_base", contiguous(code.base)))
        else:
            spec.update(scale_bits=code.bits,
                        scale_codes=add("scale_codes", pack_bits(code.codes, code.bits)),
                        scale_high=add("scale_high", contiguous(code.high)),
                        scale_low=add("scale_low", contiguous(code.low)))
        if encoded.zero_point is not None and encoded.zero_bits is not None:
            width = encoded.zero_bits
            stored = (encoded.zero_point.astype(np.int16) + (1 << (width - 1))).astype(np.uint8)
            spec.update(zero_bits=width, zero_codes=add("zero_codes", pack_bits(stored, width)))
        elif encoded.zero_point is not None:
            spec["zero_point"] = add("zero_point", contiguous(encoded.zero_point))
        return spec
    if isinstance(encoded, Dense):
        values = encoded.array if keep is None else encoded.array[keep]
        return {"type": "dense", "shape": list(encoded.shape),
                "values": add("values", contiguous(values))}
    raise ValueError(f"no safetensors layout for {type(encoded).__name__}")


def read_node(spec: dict[str, Any], get: Getter, keep: np.ndarray | None) -> Encoded:
    """The node a `node_spec` spec describes; with `keep`, its stored elements go where
    keep is True."""
    kind, shape = spec.get("type"), tuple(spec.get("shape", ()))
    if kind == "sparse":
        mask = None
        if spec["compact"]:
            mask = np.unpackbits(get(spec["mask"]), count=math.prod(shape),
                                 bitorder="little").astype(bool).reshape(shape)
        values = read_node(spec["values"], get, mask if mask is not None else keep)
        if mask is None:
            mask = values.decode() != 0
        return Sparse(mask, values, spec.get("pattern", "unstructured"))
    if kind == "quantized":
        bits = spec["bits"]
        stored = to_signed(unpack_bits(get(spec["codes"]), bits, spec["count"]), bits)
        grain = (spec["granularity"], spec["channel_axis"], spec["block_axis"], spec["group_size"])
        span = spec.get("block_span", 1)
        per_group = scale_shape(shape, *grain, span)
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
                      zero_bits=zero_bits, block_span=span)
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
        return LowRank(read_node(spec["left"], get, None), read_node(spec["right"], get, None))
    raise ModelReadError(f"unknown modelpress node type {kind!r}; upgrade modelpress")


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


def contiguous(array: np.ndarray) -> np.ndarray:
    """A C-ordered array of the same shape (np.ascontiguousarray turns a scalar into 1-D)."""
    return np.require(array, requirements="C")
