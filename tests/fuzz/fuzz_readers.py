"""Fuzz both model readers (and what compress writes) for a bounded time.

    python tests/fuzz/fuzz_readers.py                 # 5 minutes
    python tests/fuzz/fuzz_readers.py --seconds 3600  # at most an hour
    python tests/fuzz/fuzz_readers.py --engine mutate --seed 7

Inputs start from the sample models and small crafted models (plain and
compressed, both formats) and are mutated: bit flips, overwritten and
inserted bytes, truncation, splices of two inputs, and structure-aware edits
(safetensors header JSON and length field; ONNX tensors, dims, data types,
external data locations, nodes, opsets, modelpress metadata). Each input goes
through tests/fuzz/harness.py:run_one. A finding (an exception that is not a
ModelpressError, i.e. a traceback for the user, or a partial/unreadable
output, a leftover temp file, a changed input) is saved under --crashes with
its traceback and printed.

Engines:
- atheris (default when installed: `pip install atheris`, or the `fuzz`
  extra): libFuzzer with coverage feedback from modelpress's own Python code,
  so inputs that reach new branches of the readers are kept and mutated
  further; our structure-aware mutator is plugged in as its custom mutator.
- mutate: a plain seeded loop with the same mutations and no coverage
  feedback (mutants that open cleanly are kept in a pool). No dependency,
  reproducible with --seed.

Exit status: 0 if nothing was found, 1 if a finding was saved.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAX_SECONDS = 3600


class Fuzz:
    """Counts executions and findings; saves each new finding once."""

    def __init__(self, run_one, work: Path, crashes: Path, seconds: float) -> None:
        self.run_one, self.work, self.crashes = run_one, work, crashes
        self.deadline = time.monotonic() + seconds
        self.start = time.monotonic()
        self.executions, self.findings, self.seen = 0, 0, set()
        self.last_status = self.start
        self.cleanup: list[Path] = []

    def one(self, data: bytes) -> bool:
        """Run one input; True if it was a finding."""
        from harness import digest, unpack
        problem = self.run_one(data, self.work)
        self.executions += 1
        if time.monotonic() - self.last_status > 30:
            self.status()
        if problem is None:
            return False
        key = problem.splitlines()[0][:200]
        if key in self.seen:
            return True
        self.seen.add(key)
        self.findings += 1
        suffix, body = unpack(data)
        self.crashes.mkdir(parents=True, exist_ok=True)
        stem = self.crashes / f"crash-{digest(data)}"
        stem.with_suffix(suffix).write_bytes(body)
        stem.with_suffix(".txt").write_text(problem)
        print(f"\nFINDING saved as {stem.with_suffix(suffix)}:\n{problem}", flush=True)
        return True

    def done(self) -> bool:
        return time.monotonic() >= self.deadline

    def status(self) -> None:
        self.last_status = time.monotonic()
        elapsed = self.last_status - self.start
        print(f"[{elapsed:6.0f} s] {self.executions} executions "
              f"({self.executions / max(elapsed, 1e-9):.1f}/s), {self.findings} findings", flush=True)

    def summary(self, engine: str) -> int:
        """Print the counts, remove the work folders; the exit status."""
        for folder in self.cleanup:
            shutil.rmtree(folder, ignore_errors=True)
        elapsed = time.monotonic() - self.start
        print(f"\nfuzz summary: engine {engine}, {elapsed:.0f} s, {self.executions} executions, "
              f"{self.findings} distinct findings" + (f" (saved in {self.crashes})"
                                                       if self.findings else ""), flush=True)
        return 1 if self.findings else 0


def run_mutate(fuzz: Fuzz, corpus: list[bytes], seed: int) -> None:
    from harness import unpack
    from mutations import mutate
    rng = random.Random(seed)
    pool: list[bytes] = []
    for data in corpus:  # every seed once, as is
        fuzz.one(data)
    while not fuzz.done():
        parent = rng.choice(pool) if pool and rng.random() < 0.4 else rng.choice(corpus)
        child = parent
        for _ in range(rng.choice([1, 1, 2, 4])):
            child = mutate(child, rng, corpus)
        if fuzz.one(child):
            continue
        suffix, body = unpack(child)
        if (fuzz.work / f"out{suffix}").exists() and len(pool) < 256:
            pool.append(child)  # it opened and compressed: worth mutating further


def run_atheris(fuzz: Fuzz, corpus: list[bytes], seed: int, engine_args: list[str]) -> None:
    import atheris
    from mutations import mutate

    def test_one_input(data: bytes) -> None:
        if fuzz.done():
            os._exit(fuzz.summary("atheris"))
        fuzz.one(data)

    def custom_mutator(data: bytes, max_size: int, mutator_seed: int) -> bytes:
        rng = random.Random(mutator_seed)
        if rng.random() < 0.4:
            return atheris.Mutate(data, max_size)
        return mutate(data, rng, corpus)[:max_size]

    seed_dir = Path(tempfile.mkdtemp(prefix="modelpress-fuzz-corpus-"))
    fuzz.cleanup.append(seed_dir)
    for i, data in enumerate(corpus):
        (seed_dir / f"seed-{i:03d}").write_bytes(data)
    max_len = max(len(d) for d in corpus) + 4096
    seconds = int(fuzz.deadline - time.monotonic()) + 60
    argv = [sys.argv[0], str(seed_dir), f"-seed={seed}", f"-max_len={max_len}",
            f"-max_total_time={seconds}", "-timeout=120", "-rss_limit_mb=8192", *engine_args]
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300,
                        help=f"how long to fuzz (default 300, at most {MAX_SECONDS})")
    parser.add_argument("--engine", choices=["auto", "atheris", "mutate"], default="auto")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--crashes", type=Path, default=HERE / "crashes",
                        help="folder for findings (default tests/fuzz/crashes)")
    parser.add_argument("--no-samples", action="store_true",
                        help="seed with the small crafted models only (faster executions)")
    args, engine_args = parser.parse_known_args()
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "mutate"
    sys.path[:0] = [str(HERE), str(REPO)]
    # An input that makes modelpress allocate without bound becomes a MemoryError finding.
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, resource.RLIM_INFINITY))
    if engine == "atheris":
        import atheris
        with atheris.instrument_imports(include=["modelpress"]):
            import harness
            import mutations  # noqa: F401
    else:
        import harness
    work = Path(tempfile.mkdtemp(prefix="modelpress-fuzz-"))
    corpus = harness.seeds(work / "seeds", include_samples=not args.no_samples)
    print(f"fuzzing with {engine} for {args.seconds:.0f} s from {len(corpus)} seed inputs "
          f"(seed {args.seed})", flush=True)
    fuzz = Fuzz(harness.run_one, work / "run", args.crashes, args.seconds)
    fuzz.cleanup.append(work)
    if engine == "atheris":
        run_atheris(fuzz, corpus, args.seed, engine_args)
    else:
        run_mutate(fuzz, corpus, args.seed)
    return fuzz.summary(engine)


if __name__ == "__main__":
    sys.exit(main())
