"""Sharded safetensors checkpoints: read through the index, written as shards + index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from modelpress import Quantize, Recipe, compress, decompress, inspect
from modelpress.core.errors import ModelReadError, ModelWriteError
from modelpress.formats.safetensors.options import SafetensorsWriteOptions
from modelpress.formats import open_model
from modelpress.formats.safetensors.ct_config import quantization_config
from modelpress.formats.safetensors.sharded import ShardedStore, parse_size

from conftest import run_cli
from tree_helpers import sample_tensors, sharded_checkpoint


def stored_tensors(index: Path) -> dict[str, str]:
    """Every tensor actually stored in the index's shards -> its shard file name."""
    weight_map = json.loads(index.read_text())["weight_map"]
    found = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(index.parent / shard), framework="np") as f:
            for key in f.keys():
                found[key] = shard
    return found


def test_store_reads_every_tensor_through_the_index(tmp_path: Path) -> None:
    index = sharded_checkpoint(tmp_path / "ck")
    store = open_model(tmp_path / "ck")          # the folder opens through its index
    assert isinstance(store, ShardedStore) and store.path == index
    tensors = sample_tensors()
    assert set(store.tensors) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(store.read(name), array)
    assert store.file_bytes == sum(p.stat().st_size for p in (tmp_path / "ck").iterdir())


@pytest.mark.parametrize("max_shard_size", [None, 60_000])
def test_compressed_checkpoint_index_covers_every_stored_tensor(tmp_path: Path,
                                                               max_shard_size: int | None) -> None:
    src = sharded_checkpoint(tmp_path / "ck")
    out = tmp_path / "out"
    out.mkdir()
    report = compress(src, out / src.name, Recipe([Quantize(bits=4, group_size=32)]),
                      safetensors_options=SafetensorsWriteOptions(max_shard_size=max_shard_size),
                      metadata={"k": "v"})
    index = json.loads((out / src.name).read_text())
    stored = stored_tensors(out / src.name)
    assert index["weight_map"] == stored                   # both ways: nothing missing or extra
    assert any(name.endswith(".weight_packed") for name in stored)
    data_bytes = 0
    for shard in set(stored.values()):
        with safe_open(str(out / shard), framework="np") as f:
            data_bytes += sum(f.get_tensor(k).nbytes for k in f.keys())
            assert f.metadata()["format"] == "pt"
    assert index["metadata"]["total_size"] == data_bytes
    assert index["metadata"]["k"] == "v"
    files = sorted(p.name for p in out.iterdir())
    if max_shard_size is None:                              # the input's shard names are kept
        assert files == sorted(p.name for p in (tmp_path / "ck").iterdir())
    else:
        shards = [f for f in files if f.endswith("safetensors")]
        assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        parts = ("_packed", "_scale", "_shape", "_zero_point")
        for shard in shards:      # only a shard holding one tensor's parts may exceed the limit
            with safe_open(str(out / shard), framework="np") as f:
                sizes = {k: f.get_tensor(k).nbytes for k in f.keys()}
            owners = {k.rsplit("_", 1)[0] if k.endswith(parts) else k for k in sizes}
            assert sum(sizes.values()) <= max_shard_size or len(owners) == 1
    assert report.file_bytes_after == sum(p.stat().st_size for p in out.iterdir())
    assert not list(out.glob(".*"))


def test_decompressed_checkpoint_matches_input(tmp_path: Path) -> None:
    src = sharded_checkpoint(tmp_path / "ck")
    (tmp_path / "out").mkdir()
    (tmp_path / "dense").mkdir()
    report = compress(src, tmp_path / "out", Recipe([Quantize(bits=8)]))
    decompress(tmp_path / "out", tmp_path / "dense")
    restored = open_model(tmp_path / "dense")
    rows = {r.name: r for r in report.rows}
    original = sample_tensors()
    assert set(restored.tensors) == set(original)
    for name, array in original.items():
        back = restored.read(name)
        assert back.dtype == array.dtype and back.shape == array.shape
        if name in rows:
            rel = np.linalg.norm(back - array) / np.linalg.norm(array)
            assert rel == pytest.approx(rows[name].error.rel_l2, rel=1e-5)
            assert rel < 0.01
        else:
            np.testing.assert_array_equal(back, array)
    encodings = {r.name: r.encoding for r in inspect(tmp_path / "out").rows}
    assert encodings["lm_head.weight"] == "int8 ch sym" and encodings["ln_f.weight"] == "fp32"


def test_cli_inspect_and_decompress_a_sharded_folder(tmp_path: Path) -> None:
    sharded_checkpoint(tmp_path / "ck")
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(["compress", tmp_path / "ck" / "model.safetensors.index.json", "-o",
                      out / "model.safetensors.index.json", "--report", tmp_path / "r.json",
                      "quantize", "--bits", "4"])
    assert result.exit_code == 0, result.output
    from modelpress.formats.outputs import input_key
    report = json.loads((tmp_path / "r.json").read_text())
    shards = sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
    assert report["output_sha256"] == input_key(out / "model.safetensors.index.json", shards)
    shown = run_cli(["inspect", out, "--format", "json"])
    assert shown.exit_code == 0
    rows = {r["name"]: r for r in json.loads(shown.stdout)["tensors"]}
    assert rows["layers.0.mlp.fc1.weight"]["encoding"] == "int4 g128 sym"
    (tmp_path / "dense").mkdir()
    assert run_cli(["decompress", out, "-o", tmp_path / "dense"]).exit_code == 0
    assert stored_tensors(tmp_path / "dense" / "model.safetensors.index.json").keys() == \
        sample_tensors().keys()


def test_output_into_the_input_folder_is_refused(tmp_path: Path) -> None:
    src = sharded_checkpoint(tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(ModelWriteError, match="into the input's folder"):
        compress(src, tmp_path / "ck" / "other.safetensors.index.json", Recipe([Quantize()]))
    with pytest.raises(ModelWriteError, match="name the output \\*.safetensors.index.json"):
        compress(src, tmp_path / "single.safetensors", Recipe([Quantize()]))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model-00002-of-00003.safetensors").unlink(),
     "shard 'model-00002-of-00003.safetensors' (holding"),
    (lambda d: (d / "model.safetensors.index.json").write_text("{not json"),
     "not a valid safetensors index (not JSON)"),
    (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../etc/passwd"}})), "is not a plain file name"),
    (lambda d: _drop_from_index(d, "lm_head.weight"), "but the index does not list it"),
])
def test_damaged_checkpoints_fail_with_one_line(tmp_path: Path, damage, message: str) -> None:
    sharded_checkpoint(tmp_path / "ck")
    damage(tmp_path / "ck")
    with pytest.raises(ModelReadError) as caught:
        open_model(tmp_path / "ck")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def _drop_from_index(folder: Path, name: str) -> None:
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    del doc["weight_map"][name]
    index.write_text(json.dumps(doc))


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000
    for bad in ("5XB", "0", "GB", "-1"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_quantization_config_groups_and_ignore() -> None:
    shapes = {"a.weight": (8, 64), "b.weight": (8, 64), "c.weight": (8, 64), "norm.weight": (64,),
              "lm_head.weight": (10, 64), "a.bias": (8,)}

    def spec(bits: int, granularity: str, group: int | None = None) -> dict:
        return {"layout": "pack-quantized", "bits": bits, "symmetric": True,
                "granularity": granularity, "group_size": group}
    block = quantization_config(shapes, {"a.weight": spec(4, "group", 32),
                                         "b.weight": spec(4, "group", 32),
                                         "c.weight": spec(8, "channel")})
    groups = block["config_groups"]
    assert groups["group_0"]["targets"] == ["a", "b"]
    assert groups["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                            "strategy": "group", "group_size": 32,
                                            "dynamic": False}
    assert groups["group_1"]["targets"] == ["c"]
    assert groups["group_1"]["weights"]["strategy"] == "channel"
    assert groups["group_1"]["weights"]["group_size"] is None
    assert block["ignore"] == ["lm_head"]
    assert block["format"] == "pack-quantized" and block["quant_method"] == "compressed-tensors"
    mixed = {"a.weight": spec(4, "group", 32), "b.weight": {"layout": "modelpress"}}
    assert quantization_config(shapes, mixed) is None
    fp8 = {"layout": "float-quantized", "granularity": "channel", "channel_axis": 0}
    assert quantization_config(shapes, {"a.weight": spec(8, "channel"), "b.weight": fp8}) is None
    block = quantization_config(shapes, {"a.weight": fp8, "b.weight": fp8})
    assert block["format"] == "float-quantized"
    assert block["config_groups"]["group_0"]["targets"] == ["a", "b"]
    assert block["config_groups"]["group_0"]["weights"] == {
        "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
        "group_size": None, "dynamic": False}
    assert block["ignore"] == ["c", "lm_head"]
    assert quantization_config(shapes, {}) is None


def test_sweep_reads_a_sharded_folder(tmp_path: Path) -> None:
    from modelpress.formats.outputs import input_key
    index = sharded_checkpoint(tmp_path / "ck")
    (tmp_path / "r.yaml").write_text("- {name: int8, stages: [{id: quantize, bits: 8}]}\n"
                                     "- {name: int4, stages: [{id: quantize, bits: 4}]}\n")
    result = run_cli(["sweep", tmp_path / "ck", "--recipes", tmp_path / "r.yaml", "--report",
                      tmp_path / "s.json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert [r["status"] for r in report["settings"]] == ["ok", "ok"]
    shards = sorted(p for p in (tmp_path / "ck").iterdir() if p.suffix == ".safetensors")
    assert report["input_sha256"] == input_key(index, shards)
