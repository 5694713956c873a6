"""Issue 6's acceptance items, checked from the measured rows (never from stored figures).

Each check is PASS, FAIL or NOT MEASURED (the model, peer or scale run is missing), with the
figures it was decided on. Interpretations of the issue's wording are stated in `NOTES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from . import coverage
from .models import ROOT
from .report import Row, pct

PASS, FAIL, UNKNOWN = "PASS", "FAIL", "NOT MEASURED"
INT4_MODELS = ("synthetic", "magika", "open_nsfw")  # "the synthetic transformer and both real models"
MAX_INT4_BPW = 4.5
SQNR_MARGIN_Q4_0 = 1.0  # dB above gguf Q4_0
MAX_TIME_VS_ORT = 1.5
MAX_LATENCY = 1.1
MATMUL_HEAVY_SHARE = 0.5  # MatMul/Gemm share of weight elements for "MatMul-heavy"
MATMUL_HEAVY_ELEMENTS = 1_000_000  # and at least this many (below, run time is overhead)
NO_QDQ_OPTION = "session.disable_quant_qdq"

NOTES = f"""\
How the items are read:
- The modelpress rows checked are the reference rows (the first 8-bit and the first 4-bit
  modelpress configurations of run.py); the latency item covers every modelpress row.
- SQNR is compared on the weights both tools changed (onnxruntime's 4-bit quantizer changes only
  MatMul weights); "above onnxruntime's RTN at block 32" means above each of its block-32 rows
  (symmetric and asymmetric). Where the reference changed none of a peer's weights (they are
  under --min-elements), the equal-coverage row's SQNR on them is used (named in the figures).
- Output error: where a peer changed as many weight elements as the modelpress reference, the
  outputs are compared as run. Where it changed fewer (it skips weights, which then add no
  error), both comparisons are shown and the check uses the equal-coverage row: the reference's
  arguments restricted with --include to exactly the tensors the peer changed (read from its
  output), so both quantize the same weights; that row must also change all of them.
- The 4-bit time is compared with the fastest onnxruntime MatMulNBits row.
- Latency is the default-threads column (default session options). MatMul-heavy: at least
  {MATMUL_HEAVY_SHARE:.0%} of the weight elements feed MatMul/Gemm, and at least
  {MATMUL_HEAVY_ELEMENTS / 1e6:g}M of them. A model with Conv weights whose compressed form runs
  above {MAX_LATENCY}x passes only if `{NO_QDQ_OPTION}=1` brings it within {MAX_LATENCY}x and
  README.md names that option (both figures are shown).
"""


@dataclass
class CaseResult:
    """The rows of one model file and what the checks need to know about the original."""

    name: str
    fmt: str
    rows: list[Row]
    op_elements: dict[str, int] = field(default_factory=dict)  # consumer op -> weight elements

    @property
    def matmul_heavy(self) -> bool:
        """Most weights feed MatMul/Gemm, and enough of them for run time to be compute."""
        total = sum(self.op_elements.values())
        mm = self.op_elements.get("MatMul", 0) + self.op_elements.get("Gemm", 0)
        return total > 0 and mm / total >= MATMUL_HEAVY_SHARE and mm >= MATMUL_HEAVY_ELEMENTS


@dataclass
class Check:
    """One acceptance item (or one model's part of it): status and the figures behind it."""

    item: str
    status: str
    figures: str


def _ok(row: Row | None) -> bool:
    return row is not None and row.status == "ok"


def _by_label(case: CaseResult, label: str) -> Row | None:
    return next((r for r in case.rows if r.config.label == label), None)


def _peers(case: CaseResult, driver: str, **options) -> list[Row]:
    return [r for r in case.rows if r.config.driver == driver
            and all(r.config.options.get(k) == v for k, v in options.items())]


def _why(row: Row | None, what: str) -> str:
    if row is None:
        return f"{what}: not in this run"
    return f"{what}: {row.status} ({row.notes[0] if row.notes else 'no output'})"


def _db(x: float | None) -> str:
    return "-" if x is None else ("exact" if math.isinf(x) else f"{x:.2f} dB")


def _cov(row: Row) -> str:
    return f"{pct(row.stats.coverage)} coverage" if row.stats else "coverage unknown"



def _common_sqnr(a: Row, b: Row) -> tuple[float | None, float | None, int]:
    """SQNR of a and b on the weights both changed, and how many elements that is."""
    keys = set(a.stats.per_weight) & set(b.stats.per_weight)
    elements = sum(a.stats.per_weight[k][0] for k in keys)
    return a.stats.sqnr_on(keys), b.stats.sqnr_on(keys), elements


def int4_checks(cases: list[CaseResult], ref4: str) -> list[Check]:
    """modelpress int4 against gguf Q4_0 and onnxruntime's 4-bit RTN at block 32."""
    item = "int4 beats Q4_0 and ORT RTN g32"
    out = []
    for name in INT4_MODELS:
        case = next((c for c in cases if c.name == name and c.fmt == "onnx"), None)
        if case is None:
            out.append(Check(f"{item}: {name}", UNKNOWN, "model not in this run"))
            continue
        mp = _by_label(case, ref4)
        if not _ok(mp) or mp.stats is None:
            out.append(Check(f"{item}: {name}", FAIL, _why(mp, ref4)))
            continue
        failures, figures = [], []
        bpw = mp.stats.bits_per_weight
        figures.append(f"{ref4}: {bpw:.3f} bits/weight, {_cov(mp)}" if bpw else "no weight changed")
        if bpw is None or bpw > MAX_INT4_BPW:
            failures.append(f"bits/weight above {MAX_INT4_BPW}")
        failures += _vs_q4_0(case, mp, figures)
        failures += _vs_ort_g32(case, mp, figures)
        failures += _vs_ort_time(case, mp, figures)
        real = [f for f in failures if f != UNKNOWN]
        status = FAIL if real else (UNKNOWN if failures else PASS)
        if real:
            figures.append("failed: " + "; ".join(real))
        out.append(Check(f"{item}: {name}", status, "; ".join(figures)))
    out += _safetensors_int4(cases, ref4)
    return out


def _safetensors_int4(cases: list[CaseResult], ref4: str) -> list[Check]:
    """The synthetic transformer as safetensors: bits and SQNR against Q4_0 (onnxruntime's
    quantizer reads ONNX only; safetensors has no graph to run)."""
    item = "int4 beats Q4_0: synthetic (safetensors)"
    case = next((c for c in cases if c.name == "synthetic" and c.fmt == "safetensors"), None)
    mp = _by_label(case, ref4) if case else None
    if case is None or not _ok(mp) or mp.stats is None:
        return [Check(item, UNKNOWN if case is None else FAIL,
                      "model not in this run" if case is None else _why(mp, ref4))]
    bpw = mp.stats.bits_per_weight
    figures = [f"{ref4}: {bpw:.3f} bits/weight, {_cov(mp)}" if bpw else "no weight changed"]
    failures = [] if bpw is not None and bpw <= MAX_INT4_BPW else [
        f"bits/weight above {MAX_INT4_BPW}"]
    q4 = next(iter(_peers(case, "gguf", type="Q4_0")), None)
    if not _ok(q4) or q4.stats is None:
        return [Check(item, UNKNOWN, "; ".join(figures + [_why(q4, "gguf Q4_0")]))]
    ours, theirs, n = _common_sqnr(mp, q4)
    figures.append(f"SQNR {_db(ours)} vs Q4_0 {_db(theirs)} on {n:,} common elements")
    if ours is None or theirs is None or ours < theirs + SQNR_MARGIN_Q4_0:
        failures.append(f"SQNR not {SQNR_MARGIN_Q4_0:g} dB above Q4_0")
    if failures:
        figures.append("failed: " + "; ".join(failures))
    return [Check(item, FAIL if failures else PASS, "; ".join(figures))]


def _vs_q4_0(case: CaseResult, mp: Row, figures: list[str]) -> list[str]:
    q4 = next(iter(_peers(case, "gguf", type="Q4_0")), None)
    if not _ok(q4) or q4.stats is None:
        figures.append(_why(q4, "gguf Q4_0"))
        return [UNKNOWN] if q4 is None or q4.status == "skipped" else ["gguf Q4_0 gave no result"]
    ours, theirs, n = _common_sqnr(mp, q4)
    figures.append(f"SQNR {_db(ours)} vs Q4_0 {_db(theirs)} on {n:,} common elements")
    failures = []
    if ours is None or theirs is None or ours < theirs + SQNR_MARGIN_Q4_0:
        failures.append(f"SQNR not {SQNR_MARGIN_Q4_0:g} dB above Q4_0")
    found, failed = _error_against(case, mp, q4)
    figures += found
    return failures + failed


def _vs_ort_g32(case: CaseResult, mp: Row, figures: list[str]) -> list[str]:
    rows = [r for r in _peers(case, "ort_nbits", block_size=32)]
    ran = [r for r in rows if _ok(r) and r.stats is not None and r.stats.changed_elements]
    if not ran:
        reasons = ", ".join(_why(r, r.config.label) for r in rows) or "no ORT block-32 row"
        figures.append(reasons)
        return [UNKNOWN] if not rows or all(r.status == "skipped" for r in rows) else \
            ["onnxruntime block 32 changed no weight" if rows else "no ORT block-32 row"]
    failures = []
    for r in ran:
        ours, theirs, n = _common_sqnr(mp, r)
        source = ""
        eq = coverage.covering_row(case.rows, r)
        if not n and _ok(eq) and eq.stats is not None:
            # onnxruntime changed only tensors the reference leaves (under --min-elements): the
            # equal-coverage row has the reference's settings on exactly those tensors
            ours, theirs, n = _common_sqnr(eq, r)
            source = f", modelpress from {eq.config.label}"
        if not n:
            figures.append(f"SQNR vs {r.config.label}: no weight changed by both ({_cov(r)})")
            failures.append(UNKNOWN)
            continue
        figures.append(f"SQNR {_db(ours)} vs {r.config.label} {_db(theirs)} on {n:,} common "
                       f"elements ({_cov(r)}{source})")
        if ours <= theirs:
            failures.append(f"SQNR not above {r.config.label}")
    for r in ran:
        found, failed = _error_against(case, mp, r)
        figures += found
        failures += failed
    return failures


def _error_against(case: CaseResult, mp: Row, peer: Row,
                   quote_mp: bool = True) -> tuple[list[str], list[str]]:
    """Figures and failures of "modelpress's output error is below the peer's". As run when both
    changed as many weights; when the peer changed fewer, both the as-run figures and those of
    the equal-coverage modelpress row (coverage.py), which decides: weights a peer leaves in float
    add no error, so the as-run comparison measures coverage, not the quantizer."""
    label = peer.config.label
    if mp.error is None or peer.error is None:
        return [], [f"output error missing ({label})"]
    theirs = f"{peer.error.rel_l2:.4f} ({_cov(peer)})"
    as_run = (f"output rel. L2 {mp.error.rel_l2:.4f} ({_cov(mp)}) vs {label} {theirs}" if quote_mp
              else f"{label}: {theirs}")
    if not coverage.skips_more(peer, mp):
        below = mp.error.rel_l2 < peer.error.rel_l2
        return [as_run], [] if below else [f"output error not below {label}"]
    figures = [as_run + " as run, not decisive (it skips weights)"]
    eq = coverage.covering_row(case.rows, peer)
    if eq is None:
        return figures + [f"no equal-coverage modelpress row for {label}"], [UNKNOWN]
    if not _ok(eq) or eq.error is None or eq.stats is None:
        return figures + [_why(eq, eq.config.label)], [f"equal-coverage row failed ({label})"]
    figures.append(f"at {label}'s coverage: {eq.config.label} {eq.error.rel_l2:.4f} "
                   f"({_cov(eq)}) vs {peer.error.rel_l2:.4f}")
    failures = []
    lacking = coverage.changed(peer) - coverage.changed(eq)
    if lacking:
        failures.append(f"the equal-coverage row leaves {len(lacking)} of the weights {label} "
                        f"changed")
    if eq.error.rel_l2 >= peer.error.rel_l2:
        failures.append(f"output error at equal coverage not below {label}")
    return figures, failures


def _vs_ort_time(case: CaseResult, mp: Row, figures: list[str]) -> list[str]:
    ran = [r for r in _peers(case, "ort_nbits") if _ok(r) and r.run]
    if not ran:
        figures.append("no onnxruntime 4-bit time")
        return []  # reported by the SQNR part already
    fastest = min(ran, key=lambda r: r.run.seconds)
    ratio = mp.run.seconds / fastest.run.seconds
    figures.append(f"time {mp.run.seconds:.2f} s = {ratio:.2f}x {fastest.config.label} "
                   f"({fastest.run.seconds:.2f} s)")
    return [] if ratio <= MAX_TIME_VS_ORT else [f"time above {MAX_TIME_VS_ORT}x onnxruntime's"]


def int8_checks(cases: list[CaseResult], ref8: str) -> list[Check]:
    """modelpress int8 output error below quantize_dynamic (per channel) and NNCF INT8_ASYM."""
    item = "int8 output error below quantize_dynamic and NNCF"
    out = []
    for case in (c for c in cases if c.fmt == "onnx"):
        mp = _by_label(case, ref8)
        if not _ok(mp) or mp.error is None:
            out.append(Check(f"{item}: {case.name}", FAIL, _why(mp, ref8)))
            continue
        figures = [f"{ref8}: {mp.error.rel_l2:.4f} ({_cov(mp)})"]
        failures, compared = [], 0
        peers = _peers(case, "ort_dynamic", per_channel=True) + _peers(case, "nncf", mode="INT8_ASYM")
        for peer in peers:
            if not _ok(peer) or peer.error is None:
                figures.append(_why(peer, peer.config.label) if peer.status != "ok" else
                               f"{peer.config.label}: does not run "
                               f"({'; '.join(peer.notes) or 'no output error'})")
                continue
            compared += 1
            found, failed = _error_against(case, mp, peer, quote_mp=False)
            figures += found
            failures += failed
        real = [f for f in failures if f != UNKNOWN]
        status = (FAIL if real else UNKNOWN if failures else PASS) if compared else UNKNOWN
        failures = real
        if failures:
            figures.append("failed: " + "; ".join(failures))
        out.append(Check(f"{item}: {case.name}", status, "; ".join(figures)))
    return out


def latency_checks(cases: list[CaseResult], readme: Path = ROOT / "README.md") -> list[Check]:
    """Every modelpress ONNX output within 1.1x of its original (default session options), int4
    MatMul-heavy models faster; int8 Conv models may pass with the named session option."""
    readme_names = readme.is_file() and NO_QDQ_OPTION in readme.read_text(encoding="utf-8")
    item = "latency <= 1.1x (int4 MatMul-heavy < 1x)"
    out = []
    for case in (c for c in cases if c.fmt == "onnx"):
        figures, failures, measured = [], [], 0
        heavy = case.matmul_heavy
        for row in (r for r in case.rows if r.config.driver == "modelpress"):
            lat = row.latency.get(0)
            if not _ok(row) or lat is None:
                if row.status != "skipped":
                    failures.append(f"{row.config.label}: no latency")
                continue
            measured += 1
            text = f"{row.config.label} {lat.ratio:.2f}x"
            bad = lat.ratio > MAX_LATENCY
            if bad and row.latency_noqdq is not None:
                text += f" ({row.latency_noqdq.ratio:.2f}x with {NO_QDQ_OPTION}=1)"
                if row.latency_noqdq.ratio <= MAX_LATENCY and readme_names:
                    bad = False
                    text += ", README names the option"
            if bad:
                failures.append(f"{row.config.label} above {MAX_LATENCY}x")
            if heavy and row.config.bits == 4 and lat.ratio >= 1.0:
                failures.append(f"{row.config.label} not faster on a MatMul-heavy model")
            figures.append(text)
        if heavy:
            figures.insert(0, "MatMul-heavy")
        status = (FAIL if failures else PASS) if measured else UNKNOWN
        if failures:
            figures.append("failed: " + "; ".join(failures))
        out.append(Check(f"{item}: {case.name}", status, "; ".join(figures) or "no modelpress row"))
    return out


def scale_checks(scale: dict | None, why_missing: str = "") -> list[Check]:
    """The scale items from benchmarks/scale.py's figures (see run.py for the keys); `why_missing`
    says why there are none, or, with figures, where they came from."""
    st_item = "4 GiB safetensors: int4 peak RSS <= 4x largest tensor + 300 MiB; int8 <= 3x cp"
    onnx_item = "ONNX > 2 GB with external data compresses and runs, peak RSS < 2 GiB"
    if not scale:
        note = why_missing or "scale benchmark not run"
        return [Check(st_item, UNKNOWN, note), Check(onnx_item, UNKNOWN, note)]
    found = [_st_check(st_item, scale.get("safetensors")), _onnx_check(onnx_item, scale.get("onnx"))]
    if why_missing:  # how the figures were obtained
        for check in found:
            check.figures += f" ({why_missing})"
    return found


def _lacking(figures: dict | None, keys: tuple[str, ...]) -> str:
    """Which of `keys` the scale figures lack, as a sentence, or "" when all are there."""
    absent = [k for k in keys if (figures or {}).get(k) is None]
    return f"scale results lack {', '.join(absent)}" if absent else ""


def _st_check(item: str, st: dict | None) -> Check:
    lacking = _lacking(st, ("file_bytes", "largest_tensor_bytes", "cp_seconds", "int8_seconds",
                            "int4_peak_rss"))
    if lacking:
        return Check(item, UNKNOWN, lacking)
    mib = 2 ** 20
    limit = 4 * st["largest_tensor_bytes"] + 300 * mib
    ratio = st["int8_seconds"] / st["cp_seconds"]
    failures = []
    if st["file_bytes"] < 4 * 2 ** 30:
        failures.append("file under 4 GiB")
    if st["int4_peak_rss"] > limit:
        failures.append("int4 peak RSS over the limit")
    if ratio > 3:
        failures.append("int8 over 3x cp")
    figures = (f"file {st['file_bytes'] / 2**30:.2f} GiB, largest tensor "
               f"{st['largest_tensor_bytes'] / mib:.0f} MiB; int4 peak RSS "
               f"{st['int4_peak_rss'] / mib:.0f} MiB (limit {limit / mib:.0f} MiB); int8 "
               f"{st['int8_seconds']:.1f} s = {ratio:.2f}x cp ({st['cp_seconds']:.1f} s)")
    if st.get("int4_seconds") is not None:
        figures += f"; int4 {st['int4_seconds']:.1f} s = {st['int4_seconds'] / st['cp_seconds']:.2f}x cp"
    if failures:
        figures += "; failed: " + "; ".join(failures)
    return Check(item, FAIL if failures else PASS, figures)


def _onnx_check(item: str, big: dict | None) -> Check:
    lacking = _lacking(big, ("model_bytes", "compressed", "ran", "peak_rss"))
    if lacking:
        return Check(item, UNKNOWN, lacking)
    failures = []
    if big["model_bytes"] <= 2 * 10 ** 9:
        failures.append("model not over 2 GB")
    if not big["compressed"]:
        failures.append("compression failed")
    if not big["ran"]:
        failures.append("compressed model did not run")
    if big["peak_rss"] >= 2 * 2 ** 30:
        failures.append("peak RSS not under 2 GiB")
    figures = (f"model {big['model_bytes'] / 1e9:.2f} GB; compressed: {big['compressed']}; ran: "
               f"{big['ran']}; peak RSS {big['peak_rss'] / 2**20:.0f} MiB")
    if failures:
        figures += "; failed: " + "; ".join(failures)
    return Check(item, FAIL if failures else PASS, figures)


def checks(cases: list[CaseResult], ref8: str, ref4: str, scale: dict | None,
           scale_note: str = "") -> list[Check]:
    """Every acceptance item of issue 6, in the issue's order."""
    big_safetensors, big_onnx = scale_checks(scale, scale_note)
    return ([big_safetensors] + int4_checks(cases, ref4) + int8_checks(cases, ref8)
            + latency_checks(cases) + [big_onnx])


def table(found: list[Check]) -> str:
    """The checks as a Markdown table, with a count line."""
    lines = ["| item | result | figures |", "|---|---|---|"]
    for c in found:
        lines.append(f"| {c.item} | **{c.status}** | {c.figures.replace('|', '/')} |")
    counts = {s: sum(c.status == s for c in found) for s in (PASS, FAIL, UNKNOWN)}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items()), "", NOTES]
    return "\n".join(lines)
