"""Bit packing of small integer codes (vectorised; no loop over elements)."""

from __future__ import annotations

import numpy as np


def to_unsigned(codes: np.ndarray, bits: int) -> np.ndarray:
    """Shift signed codes in [-2^(b-1), 2^(b-1)) to unsigned [0, 2^b)."""
    # Modulo-256 arithmetic on the bytes: exact for codes in range, one byte per element.
    return np.asarray(codes, dtype=np.int8).view(np.uint8) + np.uint8(1 << (bits - 1))


def to_signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `to_unsigned`."""
    return (np.asarray(values, dtype=np.uint8) - np.uint8(1 << (bits - 1))).view(np.int8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values (< 2^bits) LSB-first into a flat uint8 array.

    Element j occupies bits [j*bits, (j+1)*bits) of the stream, so the result
    has ceil(n * bits / 8) bytes; for bits=4 this is ONNX's INT4 layout
    (element 0 in the low nibble).
    """
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.copy()
    if bits == 4 and flat.size % 2 == 0 and np.little_endian:
        # Byte pairs read as little-endian uint16 (first byte low): with both nibbles
        # masked, m | m >> 4 holds the packed byte in its low byte. No strides.
        pairs = flat.view(np.uint16) & np.uint16(0x0F0F)
        pairs |= pairs >> 4
        return pairs.astype(np.uint8)
    if bits == 4:
        padded = np.zeros(flat.size + (flat.size & 1), dtype=np.uint8)
        padded[: flat.size] = flat
        return (padded[0::2] & 0x0F) | (padded[1::2] << 4)
    if np.little_endian:
        return _pack_octets(flat, bits)
    # General widths: expand each value to its bits, then pack the bit stream.
    expanded = np.unpackbits(flat[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(expanded.reshape(-1), bitorder="little")


def _pack_octets(flat: np.ndarray, bits: int) -> np.ndarray:
    """`pack_bits` for widths below 8, eight values (`bits` whole bytes) at a time.

    The eight values are summed into one little-endian uint64 at their bit
    offsets; its first `bits` bytes are their stream. Zero padding to a
    multiple of eight values only adds zero bits past the end, which are cut.
    """
    count = flat.size
    padded = np.zeros(-(-count // 8) * 8, dtype=np.uint8)
    padded[:count] = flat & np.uint8((1 << bits) - 1)  # only the low bits are stored
    octets = padded.reshape(-1, 8)
    word = octets[:, 0].astype(np.uint64)
    for j in range(1, 8):
        word |= octets[:, j].astype(np.uint64) << np.uint64(bits * j)
    stream = word.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    return stream[: -(-count * bits // 8)].copy()


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` unsigned values as uint8."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size * 8 < count * bits:
        raise ValueError(f"{packed.size} bytes cannot hold {count} values of {bits} bits")
    if bits == 8:
        return packed[:count].copy()
    if bits == 4:
        out = np.empty(packed.size * 2, dtype=np.uint8)
        out[0::2] = packed & 0x0F
        out[1::2] = packed >> 4
        return out[:count]
    stream = np.unpackbits(packed, count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint8)


def pack_int32(values: np.ndarray, bits: int, axis: int = 1) -> np.ndarray:
    """compressed-tensors packing: 32 // bits unsigned values per int32 along `axis`.

    Values never straddle a word (for 3 bits, 10 per word and 2 bits unused);
    each row is zero-padded to whole words; value i of a word starts at bit i*bits.
    At 8 bits with whole words per row the result may share memory with `values`.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError("pack_int32 expects a 2-D array")
    moved = values if axis == 1 else values.T
    per_word = 32 // bits
    rows, cols = moved.shape
    words = -(-cols // per_word)
    if bits in (4, 8):
        # Value i of a word at bit i*bits is the little-endian byte order of the
        # word: pack nibbles into bytes (4 bits) and read every 4 bytes as one
        # word, with no wider temporaries than the codes themselves.
        if cols == words * per_word and axis == 1:
            # Whole words already: packing is a reinterpretation (at 8 bits no copy at
            # all), which matters on tensors of hundreds of MB.
            padded = np.ascontiguousarray(moved, dtype=np.uint8)
        else:
            padded = np.zeros((rows, words * per_word), dtype=np.uint8)
            padded[:, :cols] = moved
        if bits == 4:
            padded = padded[:, 0::2] | (padded[:, 1::2] << np.uint8(4))
        packed = padded.view("<u4").astype(np.uint32, copy=False).view(np.int32)
        return np.ascontiguousarray(packed if axis == 1 else packed.T)
    padded = np.zeros((rows, words * per_word), dtype=np.uint32)
    padded[:, :cols] = moved
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    packed = np.bitwise_or.reduce(padded.reshape(rows, words, per_word) << shifts, axis=2)
    packed = packed.astype(np.uint32).view(np.int32)
    return np.ascontiguousarray(packed if axis == 1 else packed.T)


def unpack_int32(packed: np.ndarray, bits: int, length: int, axis: int = 1) -> np.ndarray:
    """Inverse of `pack_int32`: unsigned values as uint8, `length` along `axis`."""
    words = np.asarray(packed, dtype=np.int32).view(np.uint32)
    moved = words if axis == 1 else words.T
    per_word = 32 // bits
    if moved.shape[1] * per_word < length:
        raise ValueError(f"packed rows hold {moved.shape[1] * per_word} values, need {length}")
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    mask = np.uint32((1 << bits) - 1)
    values = ((moved[:, :, None] >> shifts) & mask).reshape(moved.shape[0], -1)[:, :length]
    values = values.astype(np.uint8)
    return np.ascontiguousarray(values if axis == 1 else values.T)
