"""Ingest from an S3-compatible store with per-request latency: images/s with the concurrent image reader
(`IngestConfig.image_readers`, core/io/pool.py) vs the serial one (`image_readers=1`), measured in the same run.

A moto S3 server runs in its own process on 127.0.0.1 (as tests/conftest.py's `moto_s3`, but out of this
process so its request handling does not share our GIL); N small JPEGs are uploaded under `images/`, a JSONL
source names them, and `ingest` reads them from `s3://` with every S3 request delayed by `--latency` seconds
(injected by wrapping s3fs's request coroutine with an `asyncio.sleep`, so concurrent requests wait together, as
they would on a network). Both runs must write byte-identical ledgers and shards. Last line: `speedup: Nx` =
concurrent images/s / serial images/s on S3 (goal >= 8).

moto answers each request with tens of ms of Python CPU on this shared 2-core machine, so the concurrent run is
capped by the server, not by the reader: the run prints the server's own ceiling (GET/s with the same number of
threads and no added latency), and the same two ingests from an in-memory fsspec root whose reads wait the same
latency per request (no server CPU), which is what the reader alone gains.

    PYTHONPATH=. .venv/bin/python benchmarks/ingest_s3.py [--n 400] [--latency 0.02] [--readers 16]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core.io.ingest import IngestConfig, ingest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in a child process; returns (process, endpoint URL) once it answers."""
    import requests

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(f"{url}/moto-api/", timeout=1)
            return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def use_endpoint(url: str) -> None:
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url})
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(key, None)


def inject_latency(seconds: float) -> dict:
    """Delay every S3 request s3fs makes by `state["seconds"]` (asynchronously; change it at will); returns the
    state, whose "calls" counts requests per S3 method."""
    import s3fs

    state: dict = {"seconds": seconds, "calls": {}}
    orig = s3fs.S3FileSystem._call_s3

    async def slow(self, method, *args, **kwargs):
        state["calls"][method] = state["calls"].get(method, 0) + 1
        if state["seconds"]:
            await asyncio.sleep(state["seconds"])
        return await orig(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = slow
    return state


def server_ceiling(fs, paths: list[str], threads: int) -> float:
    """Image reads (`cat_file`, as ingest reads) per second the server answers with `threads` concurrent readers
    and no added latency: the most any reader can get from this server on this machine (moto shares our CPUs)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fs.cat_file, paths))
    return len(paths) / (time.perf_counter() - t0)


def _jpeg(rng: np.random.Generator, px: int) -> bytes:
    arr = rng.integers(0, 255, (px, px, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def memory_root(images: dict[str, bytes], latency: float, requests_per_read: int) -> str:
    """The images in fsspec's memory filesystem, each read waiting `latency` x `requests_per_read` seconds
    (a blocking wait, as a thread waits on a socket): latency without a server's CPU."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class SlowMemory(MemoryFileSystem):
        protocol = "slowmem"

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(path.removeprefix("slowmem://"))

        def cat_file(self, path, start=None, end=None, **kwargs):
            time.sleep(latency * requests_per_read)
            return super().cat_file(path, start, end, **kwargs)

    fsspec.register_implementation("slowmem", SlowMemory, clobber=True)
    fs = SlowMemory()
    for name, data in images.items():
        fs.pipe_file(f"/bench/{name}", data)
    return "slowmem:///bench"


def _outputs(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}  # the manifest holds timings and the run path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images (one per record)")
    ap.add_argument("--px", type=int, default=64, help="image side (small: the point is latency, not decode)")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to every S3 request")
    ap.add_argument("--readers", type=int, default=16, help="image_readers of the concurrent run")
    a = ap.parse_args()

    import s3fs

    proc, url = start_moto()
    try:
        use_endpoint(url)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        bucket = "ingest-bench"
        fs.mkdir(bucket)
        rng = np.random.default_rng(0)
        pool = [_jpeg(rng, a.px) for _ in range(32)]
        fs.pipe({f"{bucket}/images/{i:06d}.jpg": pool[i % len(pool)] for i in range(a.n)})
        work = Path(tempfile.mkdtemp(prefix="ingest-s3-"))
        src = work / "data.jsonl"
        src.write_text("".join(json.dumps({"id": f"r{i:06d}", "image": f"{i:06d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise."}]}) + "\n"
            for i in range(a.n)))
        state = inject_latency(0.0)
        root = f"s3://{bucket}/images"
        warm = work / "warm.jsonl"
        warm.write_text("".join(src.read_text().splitlines(keepends=True)[:20]))
        ingest(IngestConfig(source=str(warm), image_root=root, run_dir=str(work / "warm"), image_readers=a.readers))
        ceiling = server_ceiling(fs, [f"{bucket}/images/{i:06d}.jpg" for i in range(a.n)], a.readers)
        print(f"{a.n} images of {a.px}x{a.px} px on moto S3 ({url}), +{a.latency * 1000:.0f} ms per S3 request")
        print(f"  server ceiling: {ceiling:.1f} image reads/s ({a.readers} threads, no added latency)")
        state["seconds"] = a.latency
        rate, outs = {}, {}
        for readers in (1, a.readers):
            state["calls"].clear()
            t0 = time.perf_counter()
            res = ingest(IngestConfig(source=str(src), image_root=root, run_dir=str(work / f"run{readers}"),
                                      image_readers=readers))
            sec = time.perf_counter() - t0
            assert res.n_kept == a.n, res.summary()
            rate[readers] = a.n / sec
            outs[readers] = _outputs(work / f"run{readers}")
            print(f"  image_readers={readers:<3} {sec:6.2f} s  {rate[readers]:7.1f} images/s  "
                  f"S3 requests: {dict(sorted(state['calls'].items()))}", flush=True)
        per_read = max(1, round(sum(state["calls"].values()) / a.n))  # S3 requests per image read (HEAD + GET)
        print(f"  concurrent ingest at {rate[a.readers] / ceiling:.0%} of the server ceiling; serial at "
              f"{1 / rate[1] * 1000:.0f} ms per image ({per_read} requests x {a.latency * 1000:.0f} ms injected)")
        same = outs[1] == outs[a.readers]
        print(f"  ledger and shards byte-identical (1 vs {a.readers} readers): {same}")
        if not same:
            raise SystemExit("the concurrent reader changed the ingest output")
        mem = memory_root({f"{i:06d}.jpg": pool[i % len(pool)] for i in range(a.n)}, a.latency, per_read)
        mrate = {}
        for readers in (1, a.readers):
            t0 = time.perf_counter()
            ingest(IngestConfig(source=str(src), image_root=mem, run_dir=str(work / f"mem{readers}"),
                                image_readers=readers))
            mrate[readers] = a.n / (time.perf_counter() - t0)
            print(f"  no server (memory root, {per_read} x {a.latency * 1000:.0f} ms per read), image_readers="
                  f"{readers:<3} {mrate[readers]:7.1f} images/s", flush=True)
        print(f"  no-server speedup: {mrate[a.readers] / mrate[1]:.1f}x (the reader alone; same ingest code)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"speedup: {rate[a.readers] / rate[1]:.1f}x")


if __name__ == "__main__":
    main()
