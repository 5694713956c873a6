"""The peer benchmark's entry point (benchmarks/run.py): acceptance checks computed from rows,
the scale script link, option detection, and the RESULTS.md writer on a small real run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import run
from benchmarks.peerbench import report, scale_link, summary, tools
from benchmarks.peerbench.analysis import WeightStats
from benchmarks.peerbench.evaluate import Latency, OutputError
from benchmarks.peerbench.measure import ProcessRun
from benchmarks.peerbench.report import Row
from benchmarks.peerbench.tools import Config

MP8 = Config("mp int8", "modelpress", 8, ("quantize", "--bits", "8"))
MP4 = Config("mp int4", "modelpress", 4, ("quantize", "--bits", "4"))
Q4 = Config("gguf Q4_0", "gguf", 4, options={"type": "Q4_0"})
ORT32 = Config("ort g32", "ort_nbits", 4, options={"bits": 4, "block_size": 32})
ORT128 = Config("ort default", "ort_nbits", 4, options={"bits": 4})
QD = Config("qd", "ort_dynamic", 8, options={"per_channel": True})
NNCF8 = Config("nncf8", "nncf", 8, options={"mode": "INT8_ASYM"})


def _row(cfg, *, seconds=1.0, weights=None, total=None, bytes_=0, rel=None, lat=None,
         noqdq=None, status="ok", note=""):
    """A row as bench.run_case fills it: `weights` maps weight -> (elements, signal, error)."""
    row = Row(cfg, status=status, notes=[note] if note else [])
    if status != "ok":
        return row
    row.run = ProcessRun(seconds, 100 * 2**20, 0)
    weights = weights or {}
    stats = WeightStats(total_elements=total or sum(w[0] for w in weights.values()))
    for key, (n, sig, err) in weights.items():
        stats.per_weight[key] = (n, sig, err)
        stats.changed_elements += n
        stats.signal_changed += sig
        stats.error += err
    stats.changed_count, stats.storage_bytes = len(weights), bytes_
    row.stats = stats
    row.error = OutputError(rel, 1.0, "y") if rel is not None else None
    if lat is not None:
        row.latency = {0: Latency(1.0, lat, 5), 1: Latency(1.0, lat, 5)}
    if noqdq is not None:
        row.latency_noqdq = Latency(1.0, noqdq, 5)
    return row


# what bench.run_case adds when ORT changes fewer weights: modelpress on ORT's weights only
MP4_AT_ORT = Config("mp int4, onnxruntime's coverage", "modelpress", 4,
                    ("quantize", "--bits", "4", "--include", "mm"), covers=("ort g32", "ort default"))


def _int4_case(name, mp_err=1.0, mp_rel=0.07, mp_seconds=2.0, mp_bytes=4500, eq_rel=0.05):
    # two weights: "mm" (MatMul, 6000 elements) and "conv" (2000); ORT changes only "mm", so its
    # error as run (0.06) is below modelpress's (0.07); at its coverage modelpress has 0.05
    mp = _row(MP4, seconds=mp_seconds, bytes_=mp_bytes, rel=mp_rel, lat=0.8,
              weights={"mm": (6000, 1000.0, mp_err), "conv": (2000, 100.0, 0.1)})
    eq = _row(MP4_AT_ORT, bytes_=3375, rel=eq_rel, lat=0.8, total=8000,
              weights={"mm": (6000, 1000.0, mp_err)})
    q4 = _row(Q4, bytes_=4500, rel=0.08, weights={"mm": (6000, 1000.0, 2.0),
                                                  "conv": (2000, 100.0, 0.2)})
    ort = _row(ORT32, seconds=2.0, bytes_=3844, rel=0.06, total=8000,
               weights={"mm": (6000, 1000.0, 1.5)})
    ort_default = _row(ORT128, seconds=1.5, bytes_=3500, rel=0.07, total=8000,
                       weights={"mm": (6000, 1000.0, 1.8)})
    return summary.CaseResult(name, "onnx", [mp, eq, q4, ort, ort_default],
                              {"MatMul": 6_000_000, "Conv": 2000})


def test_int4_check_passes_and_quotes_common_sqnr():
    (check,) = [c for c in summary.int4_checks([_int4_case("synthetic")], "mp int4")
                if c.item.endswith("synthetic")]
    assert check.status == summary.PASS, check.figures
    # vs Q4_0 on both weights: 10 log10(1100 / 1.1) = 30.00 dB against 10 log10(1100 / 2.2)
    assert "SQNR 30.00 dB vs Q4_0 26.99 dB on 8,000 common elements" in check.figures
    # vs ORT on the MatMul weight only: 30.00 dB against 10 log10(1000 / 1.5) = 28.24 dB
    assert "SQNR 30.00 dB vs ort g32 28.24 dB on 6,000 common elements" in check.figures
    assert "4.500 bits/weight" in check.figures
    assert "time 2.00 s = 1.33x ort default (1.50 s)" in check.figures
    # ORT skips "conv": its lower error as run is shown, the equal-coverage row decides
    assert ("output rel. L2 0.0700 (100.0% coverage) vs ort g32 0.0600 (75.0% coverage) as run, "
            "not decisive (it skips weights)") in check.figures
    assert ("at ort g32's coverage: mp int4, onnxruntime's coverage 0.0500 (75.0% coverage) "
            "vs 0.0600") in check.figures


@pytest.mark.parametrize("kwargs,reason", [
    ({"mp_err": 1.6}, "SQNR not above ort g32"),         # 27.95 dB on mm < 28.24
    ({"mp_err": 1.8}, "SQNR not 1 dB above Q4_0"),       # 27.2 dB vs 26.99 on both
    ({"eq_rel": 0.065}, "output error at equal coverage not below ort g32"),
    ({"mp_rel": 0.09}, "output error not below gguf Q4_0"),
    ({"mp_seconds": 2.3}, "time above 1.5x onnxruntime's"),
    ({"mp_bytes": 4600}, "bits/weight above 4.5"),
])
def test_int4_check_fails_on_each_condition(kwargs, reason):
    check = summary.int4_checks([_int4_case("magika", **kwargs)], "mp int4")[1]
    assert check.item.endswith("magika")
    assert check.status == summary.FAIL and reason in check.figures


def test_int4_models_missing_are_not_measured():
    checks = summary.int4_checks([], "mp int4")
    assert [c.status for c in checks] == [summary.UNKNOWN] * 4


@pytest.mark.parametrize("mp_err,mp_bytes,status,reason", [
    (1.0, 4500, summary.PASS, ""),                          # 30.00 dB vs 26.99 dB
    (1.8, 4500, summary.FAIL, "SQNR not 1 dB above Q4_0"),  # 27.2 dB
    (1.0, 4600, summary.FAIL, "bits/weight above 4.5"),
])
def test_int4_safetensors_check_against_q4_0(mp_err, mp_bytes, status, reason):
    onnx_case = _int4_case("synthetic", mp_err=mp_err, mp_bytes=mp_bytes)
    mp, q4 = (next(r for r in onnx_case.rows if r.config is c) for c in (MP4, Q4))
    case = summary.CaseResult("synthetic", "safetensors", [mp, q4], {})
    check = summary.int4_checks([case], "mp int4")[-1]
    assert check.item == "int4 beats Q4_0: synthetic (safetensors)"
    assert check.status == status and reason in check.figures, check.figures


def test_int8_check_ignores_a_failed_peer_but_names_it():
    mp = _row(MP8, rel=0.01, weights={"a": (10, 1.0, 0.0001)})
    qd = _row(QD, rel=0.02, weights={"a": (10, 1.0, 0.001)})
    nncf = _row(NNCF8, status="failed", note="KeyError: 'x'")
    (check,) = summary.int8_checks([summary.CaseResult("cnn", "onnx", [mp, qd, nncf])], "mp int8")
    assert check.status == summary.PASS
    assert "nncf8: failed (KeyError: 'x')" in check.figures
    worse = _row(MP8, rel=0.03, weights={"a": (10, 1.0, 0.0001)})
    (check,) = summary.int8_checks([summary.CaseResult("cnn", "onnx", [worse, qd])], "mp int8")
    assert check.status == summary.FAIL and "not below qd" in check.figures
    (check,) = summary.int8_checks([summary.CaseResult("cnn", "onnx", [mp, nncf])], "mp int8")
    assert check.status == summary.UNKNOWN


def test_latency_check_with_session_option_and_matmul_heavy(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("set session.disable_quant_qdq=1 for int8 Conv\n")
    conv = summary.CaseResult("cnn", "onnx", [_row(MP8, lat=1.3, noqdq=1.02),
                                              _row(MP4, lat=1.05)], {"Conv": 5000})
    heavy = summary.CaseResult("synthetic", "onnx", [_row(MP8, lat=1.0), _row(MP4, lat=1.02)],
                               {"MatMul": 5_000_000, "Gather": 1_000_000})
    checks = summary.latency_checks([conv, heavy], readme)
    assert checks[0].status == summary.PASS and "README names the option" in checks[0].figures
    assert checks[1].status == summary.FAIL
    assert "mp int4 not faster on a MatMul-heavy model" in checks[1].figures
    readme.write_text("nothing here\n")
    assert summary.latency_checks([conv], readme)[0].status == summary.FAIL


def test_scale_checks_from_json_figures():
    gib, mib = 2**30, 2**20
    good = {"safetensors": {"file_bytes": 4 * gib + 1, "largest_tensor_bytes": 100 * mib,
                            "cp_seconds": 10.0, "int8_seconds": 25.0, "int4_seconds": 40.0,
                            "int4_peak_rss": 650 * mib},
            "onnx": {"model_bytes": 2_100_000_000, "compressed": True, "ran": True,
                     "peak_rss": gib}}
    st, big = summary.scale_checks(good)
    assert st.status == summary.PASS and "limit 700 MiB" in st.figures and "2.50x cp" in st.figures
    assert big.status == summary.PASS
    bad = json.loads(json.dumps(good))
    bad["safetensors"]["int8_seconds"] = 31.0
    bad["onnx"]["ran"] = False
    st, big = summary.scale_checks(bad)
    assert st.status == summary.FAIL and "int8 over 3x cp" in st.figures
    assert big.status == summary.FAIL and "did not run" in big.figures
    st, big = summary.scale_checks({"safetensors": {"cp_seconds": 1.0}})
    assert st.status == big.status == summary.UNKNOWN
    assert summary.scale_checks(None, "not present")[0].figures == "not present"


def test_scale_link_missing_and_json(tmp_path):
    missing = scale_link.run_scale(tmp_path, tmp_path / "nope.py")
    assert missing.data is None and "not present" in missing.note
    script = tmp_path / "scale.py"
    script.write_text(
        "import argparse, json\n"
        "p = argparse.ArgumentParser(); p.add_argument('--json'); p.add_argument('--workdir')\n"
        "p.add_argument('--quick', action='store_true')\n"
        "a = p.parse_args()\n"
        "print('| scale | 1 |')\n"
        "json.dump({'safetensors': {'cp_seconds': 2.0}, 'workdir': a.workdir, 'quick': a.quick},\n"
        "          open(a.json, 'w'))\n")
    got = scale_link.run_scale(tmp_path / "w", script, quick=True)
    assert got.text == "| scale | 1 |" and got.note == ""
    assert got.data == {"safetensors": {"cp_seconds": 2.0}, "workdir": str(tmp_path / "w"),
                        "quick": True}
    script.write_text("import sys\nprint('partial')\nsys.exit(3)\n")
    failed = scale_link.run_scale(tmp_path, script)
    assert failed.data is None and "exited with code 3" in failed.note and failed.text == "partial"


def test_modelpress_rows_needing_unknown_options_are_skipped():
    flags = tools.modelpress_flags()
    assert {"--bits", "--group-size", "--no-eval", "--quiet"} <= flags
    assert Config("x", "modelpress", 4, needs=("--bits",)).missing() is None
    why = Config("x", "modelpress", 4, needs=("--no-such-option",)).missing()
    assert why.startswith("this modelpress has no --no-such-option")


def test_write_results_on_a_small_run(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    assert run.main(["--models", "mlp", "--tools", "modelpress int8", "--latency-budget", "0.05",
                     "--write-results", str(out), "--workdir", str(tmp_path)]) == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    for needle in ("# Benchmark results", "- Date: ", "- CPU: ", "- RAM: ", "- OS: ", "- Python ",
                   "onnxruntime ", "### mlp (onnx)", "### mlp (safetensors)",
                   "| modelpress int8 |", "## Acceptance items of issue 6",
                   "scale benchmark not run (a subset of models or tools was asked for)"):
        assert needle in text, needle
    assert "## Acceptance items of issue 6" in printed and "### mlp (onnx)" in printed
    # the int8 item for mlp has no peer row in this run: not measured, never a pass
    assert "| int8 output error below quantize_dynamic and NNCF: mlp | **NOT MEASURED** |" in text
    assert sys.modules["benchmarks.run"] is run
    assert not list(Path(tmp_path).glob("modelpress-bench-*"))  # temporary folder removed


@pytest.mark.parametrize("share,text", [(0, "0.0%"), (1, "100.0%"), (0.9997, "99.9%"),
                                        (0.0003, "0.03%"), (0.5, "50.0%")])
def test_percentages_never_round_to_none_or_all(share, text):
    assert report.pct(share) == text


def test_int4_check_without_common_weights_is_not_measured():
    case = _int4_case("open_nsfw")
    case.rows = [r for r in case.rows if r.config is not MP4_AT_ORT]  # no equal-coverage row
    ort = next(r for r in case.rows if r.config is ORT32)
    ort.stats.per_weight = {"fc": (2000, 10.0, 0.1)}  # a weight modelpress left alone
    check = summary.int4_checks([case], "mp int4")[2]
    assert check.status == summary.UNKNOWN
    assert "SQNR vs ort g32: no weight changed by both" in check.figures


def test_output_error_follows_a_removed_cast_before_the_softmax():
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np
    from benchmarks.peerbench import evaluate

    def model(with_cast):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"])]
        if with_cast:
            nodes.append(helper.make_node("Cast", ["logits"], ["cast"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Softmax", ["cast" if with_cast else "logits"], ["p"]))
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 4])],
            [numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    original = model(True)
    feeds = {"x": np.ones((2, 3), np.float32)}
    assert evaluate.logits_name(original) == "cast"
    reference = evaluate.run_tensor(original, "cast", feeds)
    got = evaluate.output_error(reference, model(False), "cast", feeds)
    assert got.tensor == "logits" and got.rel_l2 == pytest.approx(0, abs=1e-7)


SCALE_TABLES = """\
### safetensors: 4.02 GiB bf16, 138 tensors, largest 250 MiB (built in 20 s)

cp: 10.00 s; cp + fsync of the copy: 12.00 s

| run | wall s | / cp | / (cp + fsync) | peak RSS MiB | 4 x largest + 300 MiB | within |
|---|---:|---:|---:|---:|---:|---|
| int8 channel rtn | 25.00 | 2.50 | 2.08 | 900 | 1,300 | yes |
| int4 g128 (mse) | 40.00 | 4.00 | 3.33 | 1,400 | 1,300 | NO |

### ONNX: 36 MatMuls [4096, 4096] fp32, 2.42 GB (external data), largest tensor 64 MiB

| run | wall s | peak RSS MiB | under 2 GiB | output files MB | rel. L2 error |
|---|---:|---:|---|---:|---:|
| original in onnxruntime | 3.00 | 2,600 | no | 2,416 | - |
| compress int8 | 30.00 | 700 | yes | 604 | 1.0e-02 |
| int8 output in onnxruntime | 2.00 | 800 | yes | 604 | 1.0e-02 |
"""


def test_scale_figures_read_from_printed_tables():
    data = scale_link.parse_tables("header line\n\n" + SCALE_TABLES)
    st, big = data["safetensors"], data["onnx"]
    assert st == {"file_bytes": 4.02 * 2**30, "largest_tensor_bytes": 250 * 2**20,
                  "cp_seconds": 10.0, "int8_seconds": 25.0, "int4_seconds": 40.0,
                  "int4_peak_rss": 1400 * 2**20}
    # the original's run is not the compressed model's: its 2,600 MiB does not count
    assert big == {"model_bytes": 2.42e9, "compressed": True, "ran": True,
                   "peak_rss": 800 * 2**20}
    st_check, onnx_check = summary.scale_checks(data, "read from tables")
    assert st_check.status == summary.FAIL and "int4 peak RSS over the limit" in st_check.figures
    assert onnx_check.status == summary.PASS and onnx_check.figures.endswith("(read from tables)")
    assert scale_link.parse_tables("no tables here") is None


def test_int4_output_error_at_equal_coverage_needs_the_row_and_all_the_weights():
    case = _int4_case("magika")
    case.rows = [r for r in case.rows if r.config is not MP4_AT_ORT]
    check = summary.int4_checks([case], "mp int4")[1]
    assert check.status == summary.UNKNOWN
    assert "no equal-coverage modelpress row for ort g32" in check.figures
    case = _int4_case("magika")
    eq = next(r for r in case.rows if r.config is MP4_AT_ORT)
    eq.stats.per_weight = {"other": (6000, 1000.0, 1.0)}  # not the weight ORT changed
    check = summary.int4_checks([case], "mp int4")[1]
    assert check.status == summary.FAIL
    assert "the equal-coverage row leaves 1 of the weights ort g32 changed" in check.figures
    eq.status, eq.notes = "failed", ["boom"]
    check = summary.int4_checks([case], "mp int4")[1]
    assert check.status == summary.FAIL and "equal-coverage row failed (ort g32)" in check.figures


def test_int4_sqnr_falls_back_to_the_equal_coverage_row():
    case = _int4_case("open_nsfw")
    for row in case.rows:  # ORT changed only "fc", which the reference left (too small)
        if row.config in (ORT32, ORT128, MP4_AT_ORT):
            row.stats.per_weight = {"fc": (2000, 10.0, 0.1 if row.config is ORT32 else 0.05)}
            row.stats.changed_elements = 2000
    check = summary.int4_checks([case], "mp int4")[2]
    assert check.status == summary.PASS, check.figures
    # 10 log10(10 / 0.05) = 23.01 dB against 10 log10(10 / 0.1) = 20.00 dB
    assert ("SQNR 23.01 dB vs ort g32 20.00 dB on 2,000 common elements (25.0% coverage, "
            "modelpress from mp int4, onnxruntime's coverage)") in check.figures


def test_int8_check_uses_equal_coverage_when_a_peer_skips_weights():
    mp = _row(MP8, rel=0.02, weights={"a": (10, 1.0, 0.0001), "b": (30, 1.0, 0.0001)})
    qd = _row(QD, rel=0.01, total=40, weights={"a": (10, 1.0, 0.001)})
    at_qd = Config("mp int8, onnxruntime's coverage", "modelpress", 8, covers=("qd",))
    eq = _row(at_qd, rel=0.005, total=40, weights={"a": (10, 1.0, 0.0001)})
    (check,) = summary.int8_checks([summary.CaseResult("cnn", "onnx", [mp, eq, qd])], "mp int8")
    assert check.status == summary.PASS, check.figures
    assert "at qd's coverage: mp int8, onnxruntime's coverage 0.0050 (25.0% coverage) vs " \
           "0.0100" in check.figures
    eq.error = OutputError(0.011, 1.0, "y")
    (check,) = summary.int8_checks([summary.CaseResult("cnn", "onnx", [mp, eq, qd])], "mp int8")
    assert check.status == summary.FAIL
    assert "output error at equal coverage not below qd" in check.figures
