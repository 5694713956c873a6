"""Static int8 weighed by speed: which Conv/MatMul/Gemm run faster in float on this machine.

Three forms of the model run side by side in onnxruntime with profiling (one thread,
interleaved rounds, `formats.onnx.node_time`): all float with float weights, all float with
int8 weights (weight-only DequantizeLinear), and the QDQ model of the current choice. Per
Conv/MatMul/Gemm, round by round:

- float: its float kernel(s) (onnxruntime's suffixed or fused nodes that carry its name);
- weight-only: the same plus its weight's DequantizeLinear;
- integer: its integer kernel plus an equal share of each Q/DQ conversion left on the
  activation groups it reads or writes, and of the Add/Mul/... joined to those groups
  (their float forms are charged likewise in the float models).

A form is slower only when clearly so (`node_time.clearly_slower`: median more than 10%
above, and slower in 70% of the paired rounds). Weight-only int8 is kept on a float node unless
clearly slower, and among those clearly slower, the cheapest are kept while their added time
stays within WEIGHT_ONLY_BUDGET of the float model's. An integer node clearly slower than
its float form is a candidate to stay float (the caller checks the error target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from modelpress.core.activation_ranges import ActivationRange
from modelpress.formats.onnx.node_time import NodeTimes, clearly_slower, median, owner, profile
from modelpress.formats.onnx.qdq import QdqResult, build, weight_only_ok
from modelpress.formats.onnx.qdq_sites import ARITH, COMPUTE, REMOVABLE, Sites, readers

WEIGHT_ONLY_BUDGET = 0.01
"""Most time (share of the float model's kernel time) that weight-only int8 may add in all."""


@dataclass
class Speed:
    """Per Conv/MatMul/Gemm, median microseconds of each form; the decisions."""

    float_us: dict[str, float] = field(default_factory=dict)
    weight_only_us: dict[str, float] = field(default_factory=dict)
    integer_us: dict[str, float] = field(default_factory=dict)
    total_float_us: float = 0.0
    total_int8_us: float = 0.0
    weight_only: list[str] = field(default_factory=list)
    weight_only_slower: list[str] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)
    timed: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"float_us": _rounded(self.float_us),
                "weight_only_us": _rounded(self.weight_only_us),
                "integer_us": _rounded(self.integer_us),
                "total_float_us": round(self.total_float_us, 1),
                "total_int8_us": round(self.total_int8_us, 1),
                "weight_only": list(self.weight_only),
                "weight_only_slower": list(self.weight_only_slower),
                "integer_slower": list(self.slow), "timed": self.timed}


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


def eligible(model: onnx.ModelProto) -> frozenset[str]:
    """The Conv/MatMul/Gemm whose weights can be stored as int8 while they run float."""
    inits = {t.name: t for t in model.graph.initializer}
    return frozenset(n.name for n in model.graph.node if weight_only_ok(n, inits))


def untimed(model: onnx.ModelProto) -> Speed:
    """The decisions without timing (`compress --no-time-kernels`): every float node that
    can stores int8 weights (the folded form, within noise of float where measured), and
    no integer node goes back to float for speed."""
    return Speed(weight_only=sorted(eligible(model)), timed=False)


def measure_speed(model: onnx.ModelProto, sites: Sites, ranges: dict[str, ActivationRange],
                  keep: set[str], feeds: Mapping[str, np.ndarray], tmp: Path) -> Speed:
    """Profile the three forms of `model` (see the module) on `feeds` and decide."""
    compute = [n.name for n in model.graph.node if n.op_type in COMPUTE]
    can = eligible(model)
    everything = set(sites.groups)
    forms = [build(model, sites, {}, everything),
             build(model, sites, {}, everything, weight_only=can),
             build(model, sites, ranges, keep, weight_only=can)]
    paths = []
    for i, form in enumerate(forms):
        paths.append(tmp / f"speed{i}.onnx")
        onnx.save(form.model, str(paths[-1]))
    plain, weight_only, qdq = profile(paths, feeds)
    speed = Speed(total_float_us=median(plain.total()), total_int8_us=median(qdq.total()))
    charged = _owners(forms[2], compute, sites)
    floats, with_dq = (_per_node(times, form.model, {n.name: charged.get(n.name, []) for n in
                                                     form.model.graph.node} |
                                 {n: [n] for n in compute})
                       for times, form in ((plain, forms[0]), (weight_only, forms[1])))
    integer = _per_node(qdq, forms[2].model, charged)
    speed.float_us = {n: median(t) for n, t in floats.items()}
    speed.weight_only_us = {n: median(t) for n, t in with_dq.items() if n in can}
    speed.integer_us = {n: median(integer[n]) for n in forms[2].integer if n in integer}
    costly = []
    for n in sorted(can):
        if n in floats and n in with_dq and clearly_slower(with_dq[n], floats[n]):
            costly.append((median(with_dq[n]) - median(floats[n]), n))
        else:
            speed.weight_only.append(n)
    spent = 0.0
    for extra, n in sorted(costly):
        if spent + extra <= WEIGHT_ONLY_BUDGET * speed.total_float_us:
            spent += extra
            speed.weight_only.append(n)
        else:
            speed.weight_only_slower.append(n)
    slower = []
    for n in forms[2].integer:
        best = with_dq if n in speed.weight_only else floats
        if n in integer and n in best and clearly_slower(integer[n], best[n]):
            slower.append((median(best[n]) - median(integer[n]), n))
    speed.slow = [n for _, n in sorted(slower)]  # the largest loss first
    return speed


def _owners(result: QdqResult, compute: list[str], sites: Sites) -> dict[str, list[str]]:
    """For each node of a built model: the Conv/MatMul/Gemm its time is charged to (its own
    name, the node its weight DequantizeLinear feeds, or the integer nodes around the
    activation its Q/DQ converts)."""
    g = result.model.graph
    consumers = readers(g)
    producer = {o: n for n in g.node for o in n.output}

    def group(name: str) -> str | None:
        """The site group of an activation, seen through the Q/DQ pair `build` put on it."""
        chain = [name]
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            q = producer.get(node.input[0])
            chain += [q.input[0]] if q is not None and q.op_type == "QuantizeLinear" else []
        for q in consumers.get(name, []):
            if q.op_type == "QuantizeLinear":
                chain += [dq.output[0] for dq in consumers.get(q.output[0], [])
                          if dq.op_type == "DequantizeLinear"]
        return next((sites.group_of[t] for t in chain if t in sites.group_of), None)

    around: dict[str, set[str]] = {}
    for node in g.node:
        if node.name not in result.integer:
            continue
        touched = list(node.input[:1]) + [node.output[0]] + [
            n.output[0] for n in consumers.get(node.output[0], []) if n.op_type in REMOVABLE]
        if node.op_type != "Conv" and len(node.input) > 1:
            touched.append(node.input[1])
        for t in touched:
            found = group(t)
            if found is not None:
                around.setdefault(found, set()).add(node.name)
    for _ in range(3):  # Add/Mul/... joined to those activations run integer with them
        for node in g.node:
            if node.op_type not in ARITH:
                continue
            found = {group(t) for t in list(node.input) + list(node.output[:1])} - {None}
            who = set().union(*(around.get(x, set()) for x in found))
            for x in found if who else ():
                around.setdefault(x, set()).update(who)
    owners: dict[str, list[str]] = {n.name: [] for n in g.node}
    owners.update({n: [n] for n in compute})
    for node in g.node:  # a Relu fused into the product before it
        before = producer.get(node.input[0]) if node.input else None
        if node.op_type in REMOVABLE and before is not None and before.name in compute:
            owners[node.name] = [before.name]
    for node in g.node:
        if node.op_type in ARITH:
            found = {group(t) for t in list(node.input) + list(node.output[:1])} - {None}
            owners[node.name] = sorted(set().union(*(around.get(x, set()) for x in found)))
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        readers_of = [n.name for n in consumers.get(node.output[0], []) if n.name in compute]
        if node.op_type == "DequantizeLinear" and readers_of and node.input[0] not in producer:
            owners[node.name] = readers_of[:1]  # a weight's or bias's DequantizeLinear
            continue
        found = group(node.output[0] if node.op_type == "DequantizeLinear" else node.input[0])
        if found in around:
            owners[node.name] = sorted(around[found])
    return owners


def _per_node(times: NodeTimes, model: onnx.ModelProto,
              owners: Mapping[str, list[str]]) -> dict[str, list[float]]:
    """Each Conv/MatMul/Gemm's time per round: what `owners` charges to it, shares split.
    onnxruntime names a node it rewrote after the node or after one of its outputs
    (`r1_nchwc` for a Conv fused with the Relu that writes `r1`)."""
    alias = {o: n.name for n in model.graph.node for o in n.output if o}
    alias.update({n.name: n.name for n in model.graph.node})
    names = list(alias)
    count = min((len(t) for t in times.rounds.values()), default=0)
    out: dict[str, list[float]] = {}
    for node, rounds in times.rounds.items():
        source = owner(node, names)
        share = owners.get(alias[source], []) if source is not None else []
        for n in share:
            row = out.setdefault(n, [0.0] * count)
            for i in range(count):
                row[i] += rounds[i] / len(share)
    return out
