"""Models and outputs in object storage, against a real S3-protocol server on localhost.

moto's server mode serves S3 on a free port for the module; credentials and the
endpoint reach modelpress (and the Dask workers, which inherit this process's
environment) only through the standard variables (AWS_ENDPOINT_URL ...), as on a
real deployment. Outputs written to s3:// must be byte-identical to a local run;
a model must be read by ranged GETs; an upload that fails leaves no object.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from conftest import run_cli, write_safetensors
from tree_helpers import SAMPLES, acceptance_tree, tree_files

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

INT4 = ["quantize", "--bits", "4"]
BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An S3 server with `bucket/models` (a tree of ONNX, safetensors and a sharded
    checkpoint) and the s3fs file system that modelpress's URLs resolve to."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()   # a file system made for another endpoint
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    tree = fleet(tmp_path_factory.mktemp("models"))
    fs.put(f"{tree}/", f"{BUCKET}/models/", recursive=True)
    fs.local_tree = tree
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fleet(root: Path) -> Path:
    """A sharded checkpoint with config and tokenizer, three ONNX models (one with external
    data), two safetensors files, a README."""
    acceptance_tree(root, corrupt=False)
    (root / "weights").mkdir()
    for name in ("mlp", "cnn"):
        shutil.copy(SAMPLES / f"{name}.safetensors", root / "weights" / f"{name}.safetensors")
    return root


@pytest.fixture(scope="module")
def reference(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files a local run writes for the tree."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert compress(s3.local_tree, "-o", out, "--jobs", "1", *INT4).exit_code == 0
    return tree_files(out)


def bucket_files(fs: Any, prefix: str) -> dict[str, bytes]:
    """Every object under a prefix (hidden ones left out), by relative key, with its bytes."""
    fs.invalidate_cache()
    found = {}
    for key in fs.find(f"{BUCKET}/{prefix}"):
        rel = key[len(f"{BUCKET}/{prefix}/"):]
        if not any(part.startswith(".") for part in rel.split("/")):
            found[rel] = fs.cat_file(key)
    return found


def compress(*args: Any) -> Any:
    result = run_cli(["compress", *args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), \
        result.exception
    return result


def test_a_tree_in_s3_compresses_to_s3_as_it_does_locally(s3: Any, reference: dict,
                                                          tmp_path: Path) -> None:
    expected = reference
    assert len([k for k in expected if k.endswith((".onnx", ".safetensors"))]) == 8

    result = compress(f"s3://{BUCKET}/models", "-o", f"s3://{BUCKET}/out-local", "--jobs", "1",
                      "--report", tmp_path / "r.json", *INT4)
    assert result.exit_code == 0, result.output
    assert bucket_files(s3, "out-local") == expected
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"] == f"s3://{BUCKET}/out-local" and len(report["models"]) == 6

    # --skip-existing recognizes outputs in storage (recorded in their metadata); --shard
    # takes the same slice of the listing as of a local tree; --dry-run writes nothing.
    again = compress(f"s3://{BUCKET}/models", "-o", f"s3://{BUCKET}/out-local", "--jobs", "1",
                     "--skip-existing", "--shard", "1/2", "--report", tmp_path / "r2.json", *INT4)
    assert again.exit_code == 0
    rows = json.loads((tmp_path / "r2.json").read_text())
    assert [m["status"] for m in rows["models"]] == ["skipped"] * 3
    assert {c["status"] for c in rows["copied"]} == {"skipped"}
    dry = compress(f"s3://{BUCKET}/models", "-o", f"s3://{BUCKET}/dry", "--dry-run",
                   "--shard", "1/2", "--format", "json", *INT4)
    assert dry.exit_code == 0
    planned = json.loads(dry.stdout)
    assert [r["path"] for r in planned if r["kind"] != "file"] == [
        m["path"] for m in rows["models"]]
    assert {r["action"] for r in planned if r["kind"] != "file"} == {"compress"}
    assert not s3.exists(f"{BUCKET}/dry")


def test_a_tree_in_s3_on_a_dask_cluster(s3: Any, reference: dict, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    # The workers get the endpoint and the credentials from the environment they inherit.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=":0") as cluster:
        result = compress(f"s3://{BUCKET}/models", "-o", f"s3://{BUCKET}/out-dask",
                          "--executor", "dask", "--scheduler", cluster.scheduler_address,
                          "--report", tmp_path / "r.json", *INT4)
        assert result.exit_code == 0, result.output
        assert bucket_files(s3, "out-dask") == reference
        report = json.loads((tmp_path / "r.json").read_text())
        assert "2 workers" in report["notes"][0]
        again = compress(f"s3://{BUCKET}/models", "-o", f"s3://{BUCKET}/out-dask",
                         "--executor", "dask", "--scheduler", cluster.scheduler_address,
                         "--skip-existing", "--shard", "2/2", "--report", tmp_path / "r2.json",
                         *INT4)
    assert again.exit_code == 0
    rows = json.loads((tmp_path / "r2.json").read_text())["models"]
    assert len(rows) == 3 and {m["status"] for m in rows} == {"skipped"}


@pytest.mark.parametrize("name", ["vision/mlp.onnx", "weights/cnn.safetensors"])
def test_one_model_from_a_url_to_a_url(s3: Any, tmp_path: Path, name: str) -> None:
    local = tmp_path / Path(name).name
    assert compress(s3.local_tree / name, "-o", local, "--no-eval", *INT4).exit_code == 0
    out = f"s3://{BUCKET}/single/{name}"
    result = compress(f"s3://{BUCKET}/models/{name}", "-o", out, *INT4)
    assert result.exit_code == 0, result.output
    assert bucket_files(s3, "single/" + Path(name).parent.as_posix()) == tree_files(tmp_path)
    if name.endswith(".onnx"):
        assert "output evaluation skipped (a model in object storage" in result.output


@pytest.mark.parametrize("name", ["vision/mlp.onnx", "weights/cnn.safetensors"])
def test_decompress_and_inspect_take_urls(s3: Any, tmp_path: Path, name: str) -> None:
    packed = tmp_path / Path(name).name
    assert compress(s3.local_tree / name, "-o", packed, "--no-eval", *INT4).exit_code == 0
    (tmp_path / "local-dense").mkdir()
    assert run_cli(["decompress", packed, "-o", tmp_path / "local-dense" / packed.name]
                   ).exit_code == 0
    s3.put(str(packed), f"{BUCKET}/packed/{packed.name}")
    url = f"s3://{BUCKET}/packed/{packed.name}"
    prefix = f"dense-{packed.suffix[1:]}"
    dense = run_cli(["decompress", url, "-o", f"s3://{BUCKET}/{prefix}/{packed.name}"])
    assert dense.exit_code == 0, dense.output
    assert bucket_files(s3, prefix) == tree_files(tmp_path / "local-dense")
    local = run_cli(["inspect", packed, "--format", "json"])
    remote = run_cli(["inspect", url, "--format", "json"])
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout)["tensors"] == json.loads(local.stdout)["tensors"]
    folder = run_cli(["decompress", f"s3://{BUCKET}/packed", "-o", f"s3://{BUCKET}/d2"])
    assert folder.exit_code == 1 and "takes one model file" in folder.output
    assert not s3.exists(f"{BUCKET}/d2")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every ranged GET modelpress makes: (key, start, end)."""
    from modelpress.formats import objectstore
    seen: list[tuple[str, int, int]] = []
    original = objectstore.RemoteFile.read

    def read(self: Any, offset: int, length: int) -> bytes:
        data = original(self, offset, length)
        seen.append((self.key, offset, offset + len(data)))
        return data
    monkeypatch.setattr(objectstore.RemoteFile, "read", read)
    return seen


def test_a_large_safetensors_file_is_read_by_ranges(s3: Any, tmp_path: Path,
                                                    reads: list) -> None:
    tensors = {f"layer{i}.weight": np.random.default_rng(i).standard_normal(
        (1024, 1024)).astype(np.float32) for i in range(6)}          # 6 x 4 MiB
    path = write_safetensors(tmp_path / "big.safetensors", tensors)
    s3.put(str(path), f"{BUCKET}/big/big.safetensors")
    size = path.stat().st_size

    dry = compress(f"s3://{BUCKET}/big", "-o", f"s3://{BUCKET}/big-out", "--dry-run", *INT4)
    assert dry.exit_code == 0 and sum(end - start for _, start, end in reads) < 1000
    reads.clear()

    out = f"s3://{BUCKET}/big-out/big.safetensors"
    result = compress(f"s3://{BUCKET}/big/big.safetensors", "-o", out,
                      "quantize", "--bits", "8", "--include", "layer3.weight")
    assert result.exit_code == 0, result.output
    mine = sorted((start, end) for key, start, end in reads if key.endswith("big/big.safetensors"))
    # Every byte once (header, the quantized tensor, then the others copied into the
    # output), in ranges: no GET of the whole object, none over the copy chunk.
    assert sum(end - start for start, end in mine) == size
    assert all(b[0] == a[1] for a, b in zip(mine, mine[1:]))
    assert max(end - start for start, end in mine) <= 1 << 24 < size
    header_end = mine[1][1]
    assert (header_end - 8) % 8 == 0 and len(mine) >= 4
    local = tmp_path / "local.safetensors"
    assert compress(path, "-o", local, "quantize", "--bits", "8",
                    "--include", "layer3.weight").exit_code == 0
    assert s3.cat_file(f"{BUCKET}/big-out/big.safetensors") == local.read_bytes()


def big_model(tmp_path: Path) -> Path:
    """A safetensors file whose output (cast to fp16) is over S3's 5 MiB part size."""
    tensors = {f"w{i}": np.random.default_rng(i).standard_normal((1024, 1024)).astype(np.float32)
               for i in range(3)}
    return write_safetensors(tmp_path / "w.safetensors", tensors)


@pytest.mark.parametrize("failure", [OSError("connection reset"), KeyboardInterrupt()])
def test_an_upload_that_fails_midway_leaves_no_object(s3: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      failure: BaseException) -> None:
    from modelpress.app.api import compress as api_compress
    from modelpress.core.errors import ModelWriteError
    from modelpress.core.recipe import Recipe
    from modelpress.core.cast import Cast
    from modelpress.formats import objectstore
    s3.put(str(big_model(tmp_path)), f"{BUCKET}/in/w.safetensors")
    out = f"{BUCKET}/fail/w.safetensors"
    s3.pipe(out, b"an old output")                    # replaced whole, or removed: never mixed
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 << 20)
    uploaded: list[int] = []

    def fail_after_a_part(dst: Any, done: int) -> None:
        uploaded.append(len(s3.list_multipart_uploads(BUCKET)))
        raise failure
    monkeypatch.setattr(objectstore, "after_part", fail_after_a_part)
    with pytest.raises(ModelWriteError if isinstance(failure, Exception) else KeyboardInterrupt) \
            as caught:
        api_compress(f"s3://{BUCKET}/in/w.safetensors", f"s3://{out}",
                     Recipe([Cast(dtype="fp16")]))
    if isinstance(failure, Exception):
        assert str(caught.value) == (f"s3://{out}: cannot write the output; nothing was written "
                                     "there (OSError: connection reset)")
    assert uploaded == [1]                    # a multipart upload had begun, with a part
    s3.invalidate_cache()
    assert not s3.exists(out) and s3.list_multipart_uploads(BUCKET) == []
    assert [k for k in s3.find(f"{BUCKET}/fail")] == []


def test_other_stores_commit_through_a_temporary_key(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec
    from modelpress.formats import objectstore
    memory = fsspec.filesystem("memory")
    memory.put(str(SAMPLES / "mlp.safetensors"), "/m/in/mlp.safetensors")
    result = compress("memory://m/in/mlp.safetensors", "-o", "memory://m/out/mlp.safetensors",
                      *INT4)
    assert result.exit_code == 0, result.output
    assert memory.find("/m/out") == ["/m/out/mlp.safetensors"]

    def fail(dst: Any, done: int) -> None:
        raise OSError("lost")
    monkeypatch.setattr(objectstore, "after_part", fail)
    failed = compress("memory://m/in/mlp.safetensors", "-o", "memory://m/out2/mlp.safetensors",
                      *INT4)
    assert failed.exit_code == 1 and "nothing was written there" in failed.stderr
    assert memory.find("/m/out2") == []


def test_without_fsspec_a_url_is_one_line(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "fsspec" or m.startswith("fsspec.")
                 or m == "modelpress.formats.objectstore"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fsspec", None)
    result = run_cli(["compress", "s3://bucket/models/mlp.onnx", "-o", tmp_path / "m.onnx", *INT4])
    assert result.exit_code == 1
    assert result.stderr == ("Error: object storage URLs need fsspec: pip install "
                             "'modelpress[s3]' (fsspec and s3fs; gcsfs for gs://)\n")
