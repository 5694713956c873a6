"""Bit packing is lossless and lays bits out exactly as the formats require."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress.core.packing import (pack_bits, pack_int32, to_signed, to_unsigned, unpack_bits, unpack_int32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_pack_bits_round_trip_and_size(bits: int, count: int) -> None:
    values = np.random.default_rng(bits * count).integers(0, 2**bits, count).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8
    assert packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), values)


def test_int4_layout_is_low_nibble_first() -> None:
    # ONNX INT4: element 0 in the low nibble of byte 0.
    assert pack_bits(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]


def test_three_bit_stream_is_lsb_first() -> None:
    # 5 = 101, 3 = 011 -> bits 0..5 = 1,0,1,1,1,0 -> 0b011101 = 29
    assert pack_bits(np.array([5, 3], np.uint8), 3).tolist() == [29]


def test_pack_int32_matches_compressed_tensors_example() -> None:
    # compressed-tensors' documented example: 8-bit values [129, 130] pack to 33409.
    assert pack_int32(np.array([[129, 130]], np.uint8), 8).tolist() == [[33409]]
    assert pack_int32(np.array([[129, 130]], np.uint8), 8).dtype == np.int32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_pack_int32_round_trip(bits: int, axis: int) -> None:
    values = np.random.default_rng(bits).integers(0, 2**bits, (5, 37)).astype(np.uint8)
    packed = pack_int32(values, bits, axis)
    per_word = 32 // bits
    expected = (5, -(-37 // per_word)) if axis == 1 else (-(-5 // per_word), 37)
    assert packed.shape == expected
    np.testing.assert_array_equal(unpack_int32(packed, bits, values.shape[axis], axis), values)


def test_signed_unsigned_shift() -> None:
    codes = np.array([-8, -1, 0, 7], np.int8)
    assert to_unsigned(codes, 4).tolist() == [0, 7, 8, 15]
    np.testing.assert_array_equal(to_signed(to_unsigned(codes, 4), 4), codes)
