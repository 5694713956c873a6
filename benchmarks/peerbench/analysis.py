"""Weight statistics of one tool's output against the original: coverage, bits, SQNR.

Definitions (also printed under the tables):
- weight-like elements: every element of the floating-point weights of rank >= 2 that a MatMul,
  Gemm, Conv, ConvTranspose or Gather (embedding) uses, in ONNX (one weight per consuming node);
  every floating-point tensor of rank >= 2 in safetensors.
- changed: weights whose values differ from the original's (read back exactly, see weights.py).
- coverage: changed elements / weight-like elements.
- bits per weight: 8 x the bytes of the tensors that store the changed weights (codes, scales,
  zero points; GGUF: the quantized tensor data) / the number of changed elements.
- SQNR changed: 10 log10(sum w^2 / sum (w - w')^2) over the changed weights; SQNR all: the same
  over all weight-like elements, unchanged ones counting as exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


@dataclass
class WeightStats:
    """How a tool's output stores and approximates the original weights."""

    total_elements: int
    changed_elements: int = 0
    changed_count: int = 0
    storage_bytes: int = 0
    signal_changed: float = 0.0
    signal_all: float = 0.0
    error: float = 0.0
    problems: list[str] = field(default_factory=list)
    # changed weight -> (elements, sum w^2, sum (w - w')^2): SQNR on any subset (`sqnr_on`)
    per_weight: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        return self.changed_elements / self.total_elements if self.total_elements else 0.0

    @property
    def bits_per_weight(self) -> float | None:
        if not self.changed_elements:
            return None
        return 8 * self.storage_bytes / self.changed_elements

    @property
    def sqnr_changed(self) -> float | None:
        if not self.changed_elements:
            return None
        return _db(self.signal_changed, self.error)

    @property
    def sqnr_all(self) -> float | None:
        if self.problems:
            return None
        return _db(self.signal_all, self.error)


    def sqnr_on(self, keys: Iterable[str]) -> float | None:
        """SQNR over these changed weights only (None if none of them changed)."""
        parts = [self.per_weight[k] for k in keys if k in self.per_weight]
        if not parts:
            return None
        return _db(sum(p[1] for p in parts), sum(p[2] for p in parts))


def _db(signal: float, error: float) -> float:
    return math.inf if error == 0 else 10 * math.log10(signal / error)


def compare(original: dict[str, np.ndarray], new: dict[str, np.ndarray | None],
            storage_bytes: Callable[[Iterable[str]], int],
            problems: dict[str, str] | None = None) -> WeightStats:
    """Statistics of `new` (key -> values read back, None if unreadable) against `original`.
    `storage_bytes(keys)` gives the bytes holding those weights in the output."""
    stats = WeightStats(total_elements=sum(int(w.size) for w in original.values()))
    changed = []
    for key, w in original.items():
        w64 = w.astype(np.float64)
        power = float(np.sum(w64 * w64))
        stats.signal_all += power
        got = new.get(key)
        if got is None:
            why = (problems or {}).get(key, "not found")
            stats.problems.append(f"{key}: {why}")
            continue
        if got.shape != w.shape:
            stats.problems.append(f"{key}: shape {got.shape} read back, {w.shape} expected")
            continue
        if np.array_equal(got, w):
            continue
        changed.append(key)
        error = float(np.sum(np.square(got.astype(np.float64) - w64)))
        stats.per_weight[key] = (int(w.size), power, error)
        stats.changed_elements += int(w.size)
        stats.signal_changed += power
        stats.error += error
    stats.changed_count = len(changed)
    stats.storage_bytes = storage_bytes(changed) if changed else 0
    return stats


def safetensors_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The floating-point tensors of rank >= 2 of a plain safetensors file."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="np") as f:
        for name in f.keys():
            a = f.get_tensor(name)
            if a.dtype.kind == "f" and a.ndim >= 2:
                out[name] = a.astype(np.float32)
    return out


def modelpress_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The tensors of a safetensors file modelpress wrote, decoded with modelpress's own reader
    (float32), and the bytes each stores (codes, scales, zero points)."""
    from modelpress.formats import open_model

    store = open_model(path)
    values, stored = {}, {}
    for name, _info, encoded, nbytes in store.logical_tensors():
        a = encoded.decode() if encoded is not None else store.read(name)
        if a.dtype.kind == "f":
            values[name] = np.asarray(a, np.float32)
            stored[name] = int(nbytes)
    return values, stored


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files a tool wrote (model plus any external data)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
