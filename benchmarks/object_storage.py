"""Models in object storage: bytes read from the server, and an S3 batch against a local one.

Starts an S3-protocol server on localhost (moto's server mode, in its own
process) and measures two things, printed as Markdown tables:

1. Ranged reads. A safetensors file of T tensors of 1024x2048 float32 is put
   in the bucket and compressed from s3:// to s3:// with `quantize --bits 8
   --include layers.3.weight` (one tensor changed, the others copied into the
   output), then listed with `--dry-run` (headers only). Every GET modelpress
   sends is counted at the S3 client (its ContentLength): bytes read from the
   server against the file's size, how many GETs, the largest one.
2. Batch time. A tree of M models of about S MB each (dask_batch.py's: half
   safetensors files, half ONNX MatMul chains) is compressed by

       python -m modelpress compress TREE -o OUT --jobs 1 --quiet quantize --bits 8

   from the local tree to a local folder, and from s3://bucket/tree to
   s3://bucket/out (each run a fresh process; the median of R runs). The S3
   outputs must be byte-identical to the local ones (the script exits 1 if not).

    python benchmarks/object_storage.py [--tensors 8] [--models 6] [--size-mb 25] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dask_batch import build_tree  # noqa: E402  (a sibling benchmark's tree)

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bucket"


def start_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server in its own process on a free port, and the variables that reach it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("moto's server did not start")
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    return server, env


class GetCounter:
    """Every GetObject the s3fs client sends in this process: bytes received and sizes."""

    def __init__(self) -> None:
        import s3fs
        self.sizes: list[int] = []
        original = s3fs.S3FileSystem._call_s3
        counter = self

        async def counted(fs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
            out = await original(fs, method, *args, **kwargs)
            if method == "get_object":
                counter.sizes.append(int(out["ContentLength"]))
            return out
        s3fs.S3FileSystem._call_s3 = counted

    def take(self) -> list[int]:
        sizes, self.sizes = self.sizes, []
        return sizes


def ranged_reads(fs: Any, work: Path, tensors: int) -> list[tuple[str, int, list[int]]]:
    """(what, file size, GET sizes) for a one-tensor compress and a dry run."""
    from modelpress.cli.entry import cli
    rng = np.random.default_rng(0)
    weights = {f"layers.{i}.weight": rng.standard_normal((1024, 2048)).astype(np.float32)
               for i in range(tensors)}
    path = work / "big.safetensors"
    save_file(weights, str(path))
    fs.put(str(path), f"{BUCKET}/one/big.safetensors")
    size = path.stat().st_size
    counter = GetCounter()
    rows = []
    for what, args in (
            ("compress, --include layers.3.weight",
             [f"s3://{BUCKET}/one/big.safetensors", "-o", f"s3://{BUCKET}/one-out/big.safetensors",
              "--quiet", "quantize", "--bits", "8", "--include", "layers.3.weight"]),
            ("--dry-run (headers only)",
             [f"s3://{BUCKET}/one", "-o", f"s3://{BUCKET}/one-dry", "--dry-run", "--quiet",
              "quantize", "--bits", "8"])):
        counter.take()
        try:
            cli.main(["compress", *args], standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
        rows.append((what, size, counter.take()))
    return rows


def run(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modelpress", "compress", *args, "--jobs", "1",
                    "--quiet", "quantize", "--bits", "8"], cwd=ROOT, env={**os.environ, **env},
                   check=True)
    return time.perf_counter() - start


def batch_times(fs: Any, env: dict[str, str], work: Path, models: int, size_mb: float,
                repeat: int) -> tuple[int, list[float], list[float], bool]:
    """Total bytes, local and S3 wall times, and whether the outputs are identical."""
    total = build_tree(work, models, size_mb)
    tree = work / "tree"
    fs.put(f"{tree}/", f"{BUCKET}/tree/", recursive=True)
    local, remote = [], []
    for i in range(repeat):
        local.append(run([str(tree), "-o", str(work / f"out{i}")], env))
        remote.append(run([f"s3://{BUCKET}/tree", "-o", f"s3://{BUCKET}/out{i}"], env))
    fs.invalidate_cache()
    expected = {p.relative_to(work / "out0").as_posix(): p.read_bytes()
                for p in sorted((work / "out0").rglob("*")) if p.is_file()}
    got = {k[len(f"{BUCKET}/out0/"):]: fs.cat_file(k) for k in fs.find(f"{BUCKET}/out0")}
    return total, local, remote, got == expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--size-mb", type=float, default=25)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    server, env = start_server()
    try:
        import s3fs
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            reads = ranged_reads(fs, work, args.tensors)
            total, local, remote, same = batch_times(fs, env, work, args.models, args.size_mb,
                                                     args.repeat)
    finally:
        server.terminate()
        server.wait()
    print(f"Bytes read from the server (a {args.tensors}-tensor safetensors file of 1024x2048 "
          "float32 in s3://, output to s3://):\n")
    print("| run | file size | bytes read (GETs) | read / size | GETs | largest GET |")
    print("|---|---:|---:|---:|---:|---:|")
    for what, size, sizes in reads:
        print(f"| {what} | {size / 1e6:.1f} MB | {sum(sizes) / 1e6:.3f} MB | "
              f"{sum(sizes) / size:.3f} | {len(sizes)} | {max(sizes) / 1e6:.3f} MB |")
    print(f"\nBatch of {args.models} models, {total / 1e6:.0f} MB in all, `--jobs 1 quantize "
          f"--bits 8` (median of {args.repeat} runs, each a fresh process):\n")
    print("| tree | wall time | ratio to local |")
    print("|---|---:|---:|")
    base = statistics.median(local)
    print(f"| local folder -> local folder | {base:.2f} s | 1.00 |")
    print(f"| s3://bucket/tree -> s3://bucket/out | {statistics.median(remote):.2f} s | "
          f"{statistics.median(remote) / base:.2f} |")
    print(f"\noutputs byte-identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
