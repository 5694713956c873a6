"""Every bad-input case through the CLI, each in its own process: the counts issue 15 asks for.

    python benchmarks/reliability.py                 # the corpus x every command, + issue 15's cases
    python benchmarks/reliability.py --quick         # one recipe per corpus entry
    python benchmarks/reliability.py --only issue15  # only the option and input-file cases

Cases: every entry of the bad-input corpus (tests/corpus*.py) through compress
(each recipe of tests/test_corpus.py), inspect and decompress; then the cases
of issue 15 items 10-12 (group sizes, --dim, .npz/.npy bombs, NaN and infinite
options, every path option pointed at an input). Each runs as
`python -m modelpress ...` with a 60 s limit, started from a process of its own
whose RUSAGE_CHILDREN peak RSS is then that run's alone.

Prints the counts (cases, tracebacks, partial outputs, modified inputs, hangs,
peak RSS) and every case that broke a rule; exits 1 if any did. A traceback is
"Traceback" or "internal error" in the output; a partial output is any file
left in the output folder by a failed run, or any `.modelpress-tmp` entry
after any run; a modified input is any changed byte in the case's own folder
(besides its output folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import numpy as np  # noqa: E402

from corpus import build_corpus  # noqa: E402

LIMIT_S = 60
LIMIT_RSS_MB = 500
RECIPES = {"int8": ["quantize", "--bits", "8"],
           "int4": ["quantize", "--bits", "4", "--group-size", "16"],
           "prune": ["prune", "--sparsity", "0.5"], "cluster": ["cluster"], "cast": ["cast"],
           "lowrank": ["lowrank", "--rank-ratio", "0.25"]}


@dataclass
class Case:
    """One CLI run: arguments, the folder whose files must not change, the output folder."""

    name: str
    args: list[str]
    inputs: Path
    out_dir: Path
    result: dict = field(default_factory=dict)


def snapshot(folder: Path, skip: Path) -> dict[str, str]:
    """sha256 of the case folder's files, outside every output folder (`out-*`: cases of
    one folder run at the same time, each writing its own)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        inside = path.relative_to(folder).parts
        if inside[0].startswith("out-") or skip in path.parents or path == skip \
                or not path.is_file() or path.is_symlink():
            continue
        found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run(case: Case) -> Case:
    case.out_dir.mkdir(parents=True, exist_ok=True)
    before = snapshot(case.inputs, case.out_dir)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "modelpress", *case.args], cwd=case.inputs,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=LIMIT_S)
        hang = False
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        hang = True
    seconds = time.monotonic() - start
    leftovers = [p.name for p in [*case.out_dir.rglob("*.modelpress-tmp"),
                                  *case.inputs.glob("*.modelpress-tmp")]]
    failed = proc.returncode not in (0, 3)  # 3: a threshold breach, written as asked
    partial = leftovers + ([p.name for p in case.out_dir.iterdir()] if failed else [])
    case.result = {"code": proc.returncode, "seconds": seconds, "hang": hang,
                   "traceback": "Traceback" in output or "internal error" in output,
                   "partial": partial,
                   "modified": before != snapshot(case.inputs, case.out_dir),
                   "output": output.strip().splitlines()[-1:] if output.strip() else []}
    return case


def run_measured(case: Case) -> Case:
    """`run` in a child process of its own, so its peak RSS is that run's alone."""
    code = ("import json, resource, sys; sys.path[:0] = {paths!r}; "
            "from benchmarks.reliability import Case, run; from pathlib import Path; "
            "c = run(Case({name!r}, {args!r}, Path({inputs!r}), Path({out!r}))); "
            "c.result['peak_mb'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024; "
            "print(json.dumps(c.result))").format(
        paths=[str(ROOT)], name=case.name, args=case.args, inputs=str(case.inputs),
        out=str(case.out_dir))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=LIMIT_S * 3)
    case.result = json.loads(done.stdout.strip().splitlines()[-1])
    return case


def corpus_cases(root: Path, quick: bool) -> list[Case]:
    cases = []
    for entry in build_corpus(root / "corpus"):
        folder = entry.path.parent
        suffix = (".safetensors.index.json" if entry.path.name.endswith(".index.json")
                  else entry.path.suffix)
        recipes = list(RECIPES.items())[:1] if quick else list(RECIPES.items())
        for recipe, stages in recipes:
            out = folder / f"out-{recipe}"
            cases.append(Case(f"{entry.name} compress {recipe}",
                              ["compress", str(entry.path), "-o", str(out / f"o{suffix}"),
                               *entry.group_args, *stages, *entry.stage_args], folder, out))
        cases.append(Case(f"{entry.name} inspect", ["inspect", str(entry.path)], folder,
                          folder / "out-inspect"))
        cases.append(Case(f"{entry.name} decompress",
                          ["decompress", str(entry.path), "-o",
                           str(folder / "out-dense" / f"d{suffix}")], folder,
                          folder / "out-dense"))
    return cases


def _npy_claiming(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64)


def issue15_cases(root: Path) -> list[Case]:
    """Items 10-12 and every path option pointed at a file the run reads."""
    folder = root / "issue15"
    folder.mkdir(parents=True)
    mlp = folder / "mlp.onnx"
    mlp.write_bytes((ROOT / "sample_models" / "mlp.onnx").read_bytes())
    st = folder / "mlp.safetensors"
    st.write_bytes((ROOT / "sample_models" / "mlp.safetensors").read_bytes())
    np.savez_compressed(folder / "zeros.npz", input=np.zeros((2_000_000, 64), np.float32))
    with zipfile.ZipFile(folder / "claims.npz", "w") as archive:
        archive.writestr("input.npy", _npy_claiming((10**11, 64)))
    (folder / "empty.npz").write_bytes(b"")
    with open(folder / "renamed.npz", "wb") as fh:
        np.save(fh, np.zeros((4, 64), np.float32))
    (folder / "claims.npy").write_bytes(_npy_claiming((10**11,)))
    np.savez(folder / "x.npz", input=np.zeros((8, 64), np.float32))
    np.save(folder / "y.npy", np.zeros(8, np.int64))
    (folder / "r.yaml").write_text("version: 1\nstages:\n  - {id: quantize, bits: 8}\n")
    cases = []

    def add(name: str, *args: object) -> None:
        out = folder / f"out-{len(cases)}"  # each case its own output folder
        cases.append(Case(name, [str(a).replace("{out}", str(out)) for a in args], folder,
                          out))
    for model in (mlp, st):
        for group in ("4000000", "1000000000000", str(2**63 - 1), "1e23", "0", "-1"):
            add(f"{model.name} --group-size {group}", "compress", model, "-o",
                f"{{out}}/o{model.suffix}", "--no-eval", "quantize", "--bits", "4",
                "--group-size", group)
    add("--dim batch=5000000", "compress", mlp, "-o", "{out}/o.onnx", "--dim", "batch=5000000",
        "quantize")
    for name in ("zeros", "claims", "empty", "renamed"):
        add(f"--inputs {name}.npz", "compress", mlp, "-o", "{out}/o.onnx", "--inputs",
            folder / f"{name}.npz", "quantize")
    add("--labels claims.npy", "compress", mlp, "-o", "{out}/o.onnx", "--inputs",
        folder / "x.npz", "--labels", folder / "claims.npy", "quantize")
    for option in ("--max-error", "--max-output-error", "--min-ratio", "--min-accuracy"):
        for value in ("nan", "inf", "-inf", "0", "-1", "1e400"):
            add(f"{option} {value}", "compress", mlp, "-o", "{out}/o.onnx", option, value,
                "quantize")
    for value in ("input=-inf:inf", "input=-1e308:1e308", "input=nan:1"):
        add(f"--input-range {value}", "compress", mlp, "-o", "{out}/o.onnx", "--input-range",
            value, "quantize")
    for read in ("x.npz", "y.npy", "r.yaml", "mlp.onnx"):
        add(f"--report onto {read}", "compress", mlp, "-o", "{out}/o.onnx", "--inputs",
            folder / "x.npz", "--labels", folder / "y.npy", "--report", folder / read,
            "--recipe", folder / "r.yaml")
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one recipe per corpus entry")
    parser.add_argument("--only", choices=["corpus", "issue15"], help="run one group only")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = []
        if opts.only != "issue15":
            cases += corpus_cases(root, opts.quick)
        if opts.only != "corpus":
            cases += issue15_cases(root)
        start = time.monotonic()
        with ThreadPoolExecutor(opts.jobs) as pool:
            done = list(pool.map(run_measured, cases))
        elapsed = time.monotonic() - start
    results = [c.result for c in done]
    peak = max(done, key=lambda c: c.result["peak_mb"])
    slowest = max(done, key=lambda c: c.result["seconds"])
    counts = {
        "cases": len(done),
        "tracebacks": sum(r["traceback"] for r in results),
        "partial outputs": sum(bool(r["partial"]) for r in results),
        "modified inputs": sum(r["modified"] for r in results),
        "hangs": sum(r["hang"] for r in results),
        f"over {LIMIT_RSS_MB} MB": sum(r["peak_mb"] >= LIMIT_RSS_MB for r in results),
    }
    print("| what | count |\n|---|---|")
    for what, count in counts.items():
        print(f"| {what} | {count} |")
    print(f"| peak RSS | {peak.result['peak_mb']} MB ({peak.name}) |")
    print(f"| slowest | {slowest.result['seconds']:.1f} s ({slowest.name}) |")
    print(f"| wall time | {elapsed:.0f} s |")
    bad = [c for c in done if c.result["traceback"] or c.result["partial"]
           or c.result["modified"] or c.result["hang"] or c.result["peak_mb"] >= LIMIT_RSS_MB]
    for case in bad:
        print(f"FAILED {case.name}: {json.dumps(case.result)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
