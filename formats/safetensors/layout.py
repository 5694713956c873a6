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
  described by a nested spec (bit-packed codes, bitmasks, values); see `tree`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelpress.core.encoded import Dense, Encoded, Quantized, Scaled, Sparse
from modelpress.core.errors import ModelReadError, ModelWriteError
from modelpress.core.packing import pack_int32, to_signed, to_unsigned, unpack_int32

from modelpress.formats.safetensors.tree import Getter, Parts, contiguous, node_spec, read_node


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
                [(name, contiguous(encoded.array))])
    if isinstance(encoded, Scaled):
        return _scaled(name, encoded)
    parts: Parts = []
    node = node_spec(name, encoded, None, parts)
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
        return read_node(spec["node"], get, None)
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
        (f"{prefix}_scale", contiguous(scale)),
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
        (f"{prefix}.compressed", contiguous(dense[mask])),
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
    parts: Parts = [(name, contiguous(scaled.values))]
    tensors = {"values": name}
    conventional = (scaled.dtype.name == "float8_e4m3fn" and scaled.values.ndim == 2
                    and name.endswith("weight") and scaled.channel_axis in (None, 0))
    if scaled.scale is not None:
        scale = scaled.scale.reshape(1) if scaled.channel_axis is None else scaled.scale
        parts.append((f"{name}_scale", contiguous(scale)))
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
