"""Rate-distortion of modelpress's ONNX defaults against the peers, and latency of its forms.

For each model: weight SQNR (over the MatMul/Gemm/Conv weights every scheme
quantizes), bits per weight (scales included), output relative L2 error and
top-1 agreement in onnxruntime (default session options), and the latency
ratio of modelpress's output to the original (one thread, interleaved medians).

Peers at 4 bits (gguf Q4_0, onnxruntime's 4-bit RTN at block 32) are simulated
on ALL MatMul/Gemm/Conv weights (their dequantized values written back), so
every row quantizes the same weights; modelpress runs with --min-elements 1 for
the same coverage (plus Gather tables, which the peers leave alone). At 8 bits
the peers are run as tools (quantize_dynamic per channel, NNCF INT8_ASYM).

Needs the peers' packages (this machine: /work/venv-peers) and the study's
model/input helpers (REPO/../rd or MODELPRESS_RD); prints Markdown tables.

    /work/venv-peers/bin/python benchmarks/rd_peers.py [model-substring ...] [--no-latency]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(os.environ.get("MODELPRESS_RD", str(REPO.parent / "rd")))

import onnx  # noqa: E402

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
LATENCY = "--no-latency" not in sys.argv


def _ours(model: onnx.ModelProto, stage: dict, tmp: Path, tag: str, rank: int,
          **options) -> tuple:
    """Compress with modelpress's API; returns (output path, seconds, report)."""
    from modelpress import Recipe
    from modelpress.app.api import compress
    from modelpress.core.pipeline import Options
    src, dst = tmp / f"{tag}_src.onnx", tmp / f"{tag}.onnx"
    onnx.save(_with_output_shapes(model, rank), str(src))
    start = time.perf_counter()
    report = compress(src, dst, Recipe.from_config({"version": 1, "stages": [stage]}),
                      Options(min_elements=1, **options))
    return dst, time.perf_counter() - start, report


def _with_output_shapes(model: onnx.ModelProto, rank: int) -> onnx.ModelProto:
    """The model with a shapeless first output (the exposed logits) given `rank` symbolic dims."""
    out = model.graph.output[0]
    if out.type.tensor_type.HasField("shape"):
        return model
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    shape = fixed.graph.output[0].type.tensor_type.shape
    for i in range(rank):
        shape.dim.add().dim_param = f"logits_{i}"
    return fixed


def _weight_stats(path: Path, ws: list, report) -> tuple[float, float]:
    """SQNR over the peers' weight set and bits per weight over the tensors changed."""
    from modelpress.formats import open_model
    store = open_model(path)
    sig = err = 0.0
    for name, canon, op, orig, tb in ws:
        import models
        decoded = store.decode(name).decode()
        original = models.to_orig(canon, op, orig, tb)
        sig += float(np.sum(original.astype(np.float64) ** 2))
        err += float(np.sum((original.astype(np.float64) - decoded) ** 2))
    bits = sum(r.bytes_after for r in report.rows) * 8
    elements = sum(int(np.prod(r.shape)) for r in report.rows)
    return 10 * np.log10(sig / err), bits / elements


def _latency(original: onnx.ModelProto, path: Path, feeds: dict) -> float:
    from onnxlib import interleaved_latency, session
    sessions = {"orig": session(original, threads=1), "ours": session(onnx.load(str(path)),
                                                                     threads=1)}
    # A few samples: latency per call, not throughput over the whole evaluation set.
    small = {k: v[:4] for k, v in feeds.items()}
    times = interleaved_latency(sessions, small, rounds=10, per_round=5, warmup=3)
    return times["ours"][0] / times["orig"][0]


def main() -> None:
    import modelpress.app.api  # noqa: F401  (this checkout's, before the study's path)
    import models
    import rd_output
    rows = []
    for mname, (model, feeds) in models.all_models().items():
        if "mlp" in mname or (ARGS and not any(a in mname for a in ARGS)):
            continue
        ws = models.weights_of(model)
        y0 = rd_output.run(model, feeds)
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            for key in ("gguf Q4_0", "ORT RTN asym g32 (algorithm, all weights)"):
                r = rd_output.simulate(model, feeds, y0, ws, key)
                rows.append((mname, key + " [simulated]", r["bpw"], r["sqnr"], r["rel"],
                             r["top1"], None, None))
            for i, (label, stage, opts) in enumerate((
                    ("modelpress int4 (A16 default)", {"id": "quantize", "bits": 4,
                                                       "all_layers": True}, {}),
                    ("modelpress int4 (A16, backup policy)", {"id": "quantize", "bits": 4}, {}),
                    ("modelpress int4 (A16), the peers' weights only",
                     {"id": "quantize", "bits": 4, "all_layers": True,
                      "include": [name for name, *_ in ws]}, {}),
                    ("modelpress int4 --onnx-target ort", {"id": "quantize", "bits": 4,
                                                           "all_layers": True},
                     {"onnx_target": "ort"}),
                    ("modelpress int8 (default)", {"id": "quantize", "bits": 8}, {}))):
                path, seconds, report = _ours(model, stage, tmp, f"ours{i}", y0.ndim, **opts)
                sqnr, bpw = _weight_stats(path, ws, report)
                y = rd_output.run(onnx.load(str(path)), feeds)
                rel, top1 = rd_output.metrics(y, y0)
                lat = _latency(model, path, feeds) if LATENCY else None
                rows.append((mname, label, bpw, sqnr, rel, top1, lat, seconds))
            for label, make in (("onnxruntime quantize_dynamic per channel [run]",
                                 rd_output.ort_dynamic_model),
                                ("NNCF INT8_ASYM [run]", rd_output.nncf_model)):
                try:
                    qmodel = make(model)
                    y = rd_output.run(qmodel, feeds)
                    rel, top1 = rd_output.metrics(y, y0)
                    lat = None
                    if LATENCY:
                        onnx.save(qmodel, str(tmp / "peer.onnx"))
                        lat = _latency(model, tmp / "peer.onnx", feeds)
                    rows.append((mname, label, None, None, rel, top1, lat, None))
                except Exception as exc:  # a peer failing is a result
                    rows.append((mname, f"{label}: fails ({type(exc).__name__}: "
                                 f"{str(exc)[:80]})", None, None, None, None, None, None))
        _print(rows)
        rows = []


def _print(rows: list) -> None:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    print("\n| model | scheme | bpw | weight SQNR dB | output rel L2 | top-1 | latency ratio |"
          " compress s |")
    print("|---|---|---|---|---|---|---|---|")
    for m, key, bpw, sqnr, rel, top1, lat, sec in rows:
        print(f"| {m} | {key} | {f(bpw, '.3f')} | {f(sqnr, '.2f')} | {f(rel, '.4f')} | "
              f"{f(top1, '.3f')} | {f(lat, '.2f')} | {f(sec, '.2f')} |", flush=True)


if __name__ == "__main__":
    main()
