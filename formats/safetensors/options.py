"""safetensors writer settings."""

from __future__ import annotations

from dataclasses import dataclass

from modelpress.core.store import WriteOptions


@dataclass(frozen=True)
class SafetensorsWriteOptions(WriteOptions):
    """How safetensors weights are written. `max_shard_size`: a sharded checkpoint is
    cut into shards of at most this many bytes instead of keeping the input's shards
    (a single file stays one file)."""

    max_shard_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_shard_size is not None and self.max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be positive, not {self.max_shard_size}")


__all__ = ["SafetensorsWriteOptions"]
