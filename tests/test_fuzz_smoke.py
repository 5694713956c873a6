"""The fuzz harness works: seeds pass, a short seeded run finds nothing, planted bugs are found.

The real fuzz run is `python tests/fuzz/fuzz_readers.py` (5 minutes by default).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from modelpress import ModelWriteError
from modelpress.formats import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
import harness  # noqa: E402
from mutations import mutate  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return harness.seeds(tmp_path_factory.mktemp("seeds"), include_samples=False)


def test_every_seed_compresses_cleanly(corpus: list[bytes], tmp_path: Path) -> None:
    assert len(corpus) >= 15
    for data in corpus:
        assert harness.run_one(data, tmp_path / "w") is None
        suffix, _ = harness.unpack(data)
        work = tmp_path / "w"
        assert (work / f"restored{suffix}").exists()  # decompress wrote
        compressed = bool(open_model(work / f"model{suffix}").encodings)
        assert (work / f"out{suffix}").exists() != compressed  # compress wrote unless refused


def test_a_short_seeded_mutation_run_finds_nothing(corpus: list[bytes], tmp_path: Path) -> None:
    rng = random.Random(1234)
    outcomes = {"refused": 0, "compressed": 0}
    for _ in range(80):
        data = mutate(rng.choice(corpus), rng, corpus)
        assert harness.run_one(data, tmp_path / "w") is None, data[:64]
        suffix, _ = harness.unpack(data)
        outcomes["compressed" if (tmp_path / "w" / f"out{suffix}").exists() else "refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["compressed"] > 0, outcomes


def test_mutations_are_deterministic_and_keep_the_format(corpus: list[bytes]) -> None:
    for data in corpus[:6]:
        a = mutate(data, random.Random(7), corpus)
        b = mutate(data, random.Random(7), corpus)
        assert a == b and a[0] == data[0]


def test_a_traceback_is_a_finding(corpus: list[bytes], tmp_path: Path, monkeypatch) -> None:
    def broken(path):
        raise ValueError("planted bug")
    monkeypatch.setattr(harness, "open_model", broken)
    found = harness.run_one(corpus[0], tmp_path / "w")
    assert found is not None and found.startswith("ValueError: planted bug")


def test_a_partial_output_is_a_finding(corpus: list[bytes], tmp_path: Path, monkeypatch) -> None:
    def leaves_output(src, dst, recipe, options):
        Path(dst).write_bytes(b"half")
        raise ModelWriteError("planted")
    monkeypatch.setattr(harness, "compress", leaves_output)
    assert harness.run_one(corpus[0], tmp_path / "w") == "compress failed but left an output file"
