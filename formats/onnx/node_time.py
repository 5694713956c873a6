"""Per-node kernel times of ONNX models in onnxruntime (CPU, one thread), measured side by
side so that a busy shared machine slows every model alike.

Each model gets a profiling session (`SessionOptions.enable_profiling`); the models run in
turn, rotating which goes first, for a number of rounds after one warm-up run each. The
profile has one `<node>_kernel_time` event per node and run; `NodeTimes` keeps every
node's time per round (microseconds), so a comparison can be paired round by round.
Node names are those of onnxruntime's optimized graph: a fused integer kernel keeps the
name of the node it replaced; float nodes may gain suffixes (`..._nchwc`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from modelpress.core.errors import ModelRunError
from modelpress.formats.onnx.feeds import first_line

ROUNDS = 15
"""Profiled runs per model (after a warm-up run)."""
SLOWER = 1.10
"""An integer form is slower than the float one only if its median is more than 10% above
the float median and it is slower in at least SURE of the paired rounds (a loaded machine has
spikes: a median alone can be pulled by a few)."""
SURE = 0.7


@dataclass
class NodeTimes:
    """One model's kernel times: node name -> one time (us) per round, and its op type."""

    rounds: dict[str, list[float]] = field(default_factory=dict)
    ops: dict[str, str] = field(default_factory=dict)

    def total(self) -> list[float]:
        """The whole run's kernel time per round."""
        count = min((len(t) for t in self.rounds.values()), default=0)
        return [sum(t[i] for t in self.rounds.values()) for i in range(count)]

    def of(self, names: Sequence[str]) -> list[float]:
        """The summed time of `names` per round (absent names count 0)."""
        count = min((len(t) for t in self.rounds.values()), default=0)
        return [sum(self.rounds[n][i] for n in names if n in self.rounds) for i in range(count)]


def profile(paths: Sequence[Path], feeds: Mapping[str, np.ndarray],
            rounds: int = ROUNDS) -> list[NodeTimes]:
    """Kernel times of each model at `paths` on `feeds`, run interleaved (see the module)."""
    with tempfile.TemporaryDirectory(prefix="modelpress-profile-") as tmp:
        sessions = []
        for i, path in enumerate(paths):
            options = ort.SessionOptions()
            options.log_severity_level = 4
            options.intra_op_num_threads = 1
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"model{i}")
            try:
                sessions.append(ort.InferenceSession(str(path), options,
                                                     providers=["CPUExecutionProvider"]))
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelRunError(f"onnxruntime cannot load {path}: {first_line(exc)}") \
                    from None
        for s in sessions:
            s.run(None, dict(feeds))
        for r in range(rounds):
            order = list(range(len(sessions)))
            for i in order[r % len(order):] + order[:r % len(order)]:
                sessions[i].run(None, dict(feeds))
        return [_read(Path(s.end_profiling())) for s in sessions]


def _read(path: Path) -> NodeTimes:
    """A profile's node times, the warm-up run dropped."""
    found = NodeTimes()
    for event in json.loads(path.read_text()):
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[:-len("_kernel_time")]
        found.rounds.setdefault(node, []).append(float(event.get("dur", 0)))
        found.ops[node] = event.get("args", {}).get("op_name", "")
    found.rounds = {n: t[1:] for n, t in found.rounds.items()}
    return found


def owner(name: str, nodes: Sequence[str]) -> str | None:
    """The node of `nodes` an optimized-graph node `name` comes from: the same name, or the
    longest one it extends (`conv_1` -> `conv_1:0_nchwc`, not `conv_10`)."""
    if name in nodes:
        return name
    best = None
    for n in nodes:
        if n and name.startswith(n) and not name[len(n)].isdigit() and (
                best is None or len(n) > len(best)):
            best = n
    return best


def clearly_slower(slow: Sequence[float], fast: Sequence[float]) -> bool:
    """`slow` (per round) above `fast` by SLOWER in median and in SURE of the paired rounds."""
    if not slow or not fast:
        return False
    paired = sum(a > b for a, b in zip(slow, fast)) / min(len(slow), len(fast))
    return statistics.median(slow) > SLOWER * statistics.median(fast) and paired >= SURE


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0
