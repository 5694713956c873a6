"""Equal-coverage rows: modelpress restricted to exactly the weights a peer changed.

A peer that skips weights (onnxruntime's 4-bit quantizer takes MatMul weights only) leaves the
rest in float, so its output error "as run" is lower for what it did not do. To compare the
quantizers themselves, the benchmark adds a modelpress row with the reference row's arguments
plus `--include` naming each tensor the peer changed, read from the peer's output (the weights
whose values differ from the original's), never from a list of names.
"""

from __future__ import annotations

import re
from typing import Iterable

import onnx

from .report import Row
from .tools import Config
from .weights import WEIGHT_INPUT, GraphIndex

OWNERS = {"ort_dynamic": "onnxruntime", "ort_nbits": "onnxruntime", "nncf": "NNCF",
          "gguf": "gguf"}


def changed(row: Row) -> frozenset[str]:
    """The weights (consumer output names) a row's tool changed."""
    return frozenset(row.stats.per_weight) if row.stats else frozenset()


def skips_more(peer: Row, reference: Row) -> bool:
    """True when the peer ran and changed fewer weight elements than the modelpress reference
    (but some): its output error is not comparable with the reference's as run."""
    if peer.config.driver == "modelpress" or peer.status != "ok" or reference.status != "ok":
        return False
    if peer.stats is None or reference.stats is None:
        return False
    return 0 < peer.stats.changed_elements < reference.stats.changed_elements


def stored_names(model: onnx.ModelProto, keys: Iterable[str]) -> set[str]:
    """The initializers and Constant outputs holding the weights of these consumers (by output
    name) in the original model: the names modelpress's --include matches."""
    index = GraphIndex(model)
    names: set[str] = set()
    for key in keys:
        node = index.producer.get(key)
        if node is None or node.op_type not in WEIGHT_INPUT:
            raise ValueError(f"no weight consumer produces {key!r} in the original")
        names |= index.leaves(node.input[WEIGHT_INPUT[node.op_type]])
    return names


def literal_glob(name: str) -> str:
    """A glob (fnmatch) that matches exactly this name: *, ? and [ bracketed."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def equal_coverage_configs(rows: list[Row], reference: Config,
                           model: onnx.ModelProto) -> list[Config]:
    """One modelpress config per distinct set of weights that peers at the reference's bits
    changed when they changed fewer than the reference did; `covers` names those peers."""
    ref = next((r for r in rows if r.config.label == reference.label), None)
    if ref is None:
        return []
    groups: dict[frozenset[str], list[Row]] = {}
    for row in rows:
        if row.config.bits == reference.bits and skips_more(row, ref):
            groups.setdefault(changed(row), []).append(row)
    configs: list[Config] = []
    for keys, peers in groups.items():
        owners = list(dict.fromkeys(OWNERS.get(p.config.driver, p.config.driver) for p in peers))
        label = f"{reference.label}, {' and '.join(owners)}'s coverage"
        if any(c.label == label for c in configs):
            label += f" ({peers[0].config.label})"
        names = sorted(stored_names(model, keys))
        include = tuple(arg for n in names for arg in ("--include", literal_glob(n)))
        configs.append(Config(label, "modelpress", reference.bits, reference.args + include,
                              covers=tuple(p.config.label for p in peers),
                              calibrated=reference.calibrated))
    return configs


def covering_row(rows: list[Row], peer: Row) -> Row | None:
    """The equal-coverage modelpress row made for this peer, if any."""
    return next((r for r in rows if peer.config.label in r.config.covers), None)


def coverage_note(row: Row, reference: Config) -> str:
    """What an equal-coverage row is, for its notes cell."""
    names = [a for a in row.config.args[len(reference.args):] if a != "--include"]
    shown = ", ".join(f"`{n}`" for n in names) if len(names) <= 3 else f"{len(names)} tensors"
    return (f"as {reference.label}, only the weights {' / '.join(row.config.covers)} changed "
            f"(--include {shown})")
