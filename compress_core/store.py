"""What the pipeline needs from a model file; `formats` provides the implementations."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

import numpy as np

from .encoded import Encoded
from .tensorinfo import TensorInfo

Progress = Callable[[int, int, str], None]
"""progress(done, total, what): called as work advances."""


@dataclass
class WriteResult:
    """What a writer wrote: bytes per changed tensor, the file size, and notes."""

    tensor_bytes: dict[str, int]
    file_bytes: int
    notes: list[str] = field(default_factory=list)


class TensorStore(Protocol):
    """A model opened for reading, one tensor at a time."""

    path: Path
    format: str

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor in file order."""

    @property
    def file_bytes(self) -> int:
        """Size of the model on disk, external data included."""

    def read(self, name: str) -> np.ndarray:
        """One tensor's data."""

    def write(self, dst: Path, encoded: Mapping[str, Encoded],
              progress: Progress | None = None) -> WriteResult:
        """Write the model with `encoded` tensors replaced, atomically, in this format."""
