"""Ingest from an S3-compatible store with per-request latency: images/s with the concurrent image reader
(`IngestConfig.image_readers`, core/io/pool.py + core/io/remote.py) vs the serial one (`image_readers=1`),
measured in the same run, with the CPU each side spends per image.

A moto S3 server runs in its own process on 127.0.0.1 (out of this process, so its request handling does not
share our GIL); N small JPEGs are uploaded under `images/`, a JSONL source names them, and `ingest` reads them
from `s3://` with every S3 request delayed by `--latency` seconds (an `asyncio.sleep` in s3fs's request
coroutine, so concurrent requests wait together, as they would on a network). Both runs must write
byte-identical ledgers and shards. Last line: `speedup: Nx` = concurrent images/s / serial images/s (goal >= 8).

The server is moto's S3 application (the S3 REST protocol over loopback, moto's own request parsing and
storage) behind werkzeug's threaded server with HTTP/1.1 keep-alive (`--server keepalive`, the default).
`moto_server` as shipped (`--server moto`) answers every request with `Connection: close`, waits 10 ms
after each response to drain the socket, logs a line per request and matches the host against every AWS
service's URL patterns under one lock: ~2.5 ms of server CPU and a new TCP connection (and server thread) per
GET, where an S3 endpoint keeps connections open. On a 2-core machine client and server share the cores,
so their CPU per request, not the reader, caps the concurrent run; the run prints both, the reads/s that
server and client manage with no added latency (the ceiling), and the same two ingests from an in-memory
fsspec root whose reads wait the same latency (no server CPU): what the reader alone gains.
`--reader threads` runs ingest's former S3 reader (16 threads each calling s3fs's sync `cat_file`) for comparison.

    PYTHONPATH=. .venv/bin/python benchmarks/ingest_s3.py [--n 400] [--latency 0.02] [--readers 16] [--server moto]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int) -> None:
    """moto's S3 app on 127.0.0.1:`port`, threaded, HTTP/1.1 keep-alive (runs until killed)."""
    import logging

    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class KeepAlive(MotoRequestHandler):
        """werkzeug's handler closes every connection (it cannot find the end of an unread request body); this one
        reads the whole body before the app runs and sends a Content-Length, so the connection stays usable."""

        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        timeout = 120  # an idle connection's thread ends

        def log_request(self, *args, **kwargs) -> None:  # a line per request is CPU the server does not need
            pass

        def run_wsgi(self) -> None:
            environ = self.make_environ()
            stream, n = environ["wsgi.input"], int(self.headers.get("Content-Length") or 0)
            body = stream.read() if environ.get("wsgi.input_terminated") else stream.read(n) if n else b""
            environ["wsgi.input"] = io.BytesIO(body)
            out: dict = {}
            chunks: list[bytes] = []

            def start_response(status, headers, exc_info=None):
                out["status"], out["headers"] = status, headers
                return chunks.append

            try:
                it = self.server.app(environ, start_response)
                try:
                    chunks.extend(it)
                finally:
                    if hasattr(it, "close"):
                        it.close()
            except Exception as e:  # as werkzeug: a 500, and this connection is closed
                self.log_error("error on request: %r", e)
                self.send_error(500)
                return
            data = b"".join(chunks)
            code, _, reason = out["status"].partition(" ")
            self.send_response(int(code), reason)
            names = set()
            for name, value in out["headers"]:
                names.add(name.lower())
                self.send_header(name, value)
            no_body = self.command == "HEAD" or int(code) < 200 or int(code) in (204, 304)
            if "content-length" not in names and not no_body:
                self.send_header("Content-Length", str(len(data)))
            self._headers_buffer.append(b"\r\n")
            if not no_body:
                self._headers_buffer.append(data)
            self.flush_headers()  # headers and body in one write

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    make_server("127.0.0.1", port, create_backend_app("s3"), threaded=True, request_handler=KeepAlive).serve_forever()


def start_server(kind: str) -> tuple[subprocess.Popen, str]:
    """An S3 server in a child process (`keepalive`: `serve`; `moto`: moto_server as shipped); returns (process,
    endpoint URL) once it answers."""
    import requests

    port = _free_port()
    code = ("from moto.server import main; main()" if kind == "moto" else
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from ingest_s3 import serve; serve({port})")
    proc = subprocess.Popen([sys.executable, "-c", code, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(f"{url}/", timeout=1)
            return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("S3 server did not start")


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


class Meter:
    """Wall seconds and CPU seconds of this process (all its threads) and of the server process over a block."""

    def __init__(self, server_pid: int):
        self.pid = server_pid

    def _server_cpu(self) -> float:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:  # no /proc (not Linux): the server's CPU is not shown
            return float("nan")

    def __enter__(self) -> Meter:
        r = resource.getrusage(resource.RUSAGE_SELF)
        self._t, self._c, self._s = time.perf_counter(), r.ru_utime + r.ru_stime, self._server_cpu()
        return self

    def __exit__(self, *exc) -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.wall = time.perf_counter() - self._t
        self.client = r.ru_utime + r.ru_stime - self._c
        self.server = self._server_cpu() - self._s

    def line(self, n: int) -> str:
        return (f"{n / self.wall:7.1f} images/s  CPU per image: client {self.client / n * 1000:4.2f} ms, "
                f"server {self.server / n * 1000:4.2f} ms")


def read_ceiling(fs, root: str, names: list[str], readers: int, async_reads: bool = True) -> None:
    """Read every image through the concurrent reader alone (core/io/pool.py on s3fs's loop, no ingest work)."""
    from functools import partial

    from core.io.ingest import _read_image, _safe_image_path
    from core.io.pool import read_ahead
    from core.io.remote import async_image_reader

    aread = async_image_reader(fs, partial(_safe_image_path, root), 1 << 30) if async_reads else None
    with closing(read_ahead(names, lambda n: (n, [n]), partial(_read_image, fs, root, False, 1 << 30), readers,
                            aread=aread)) as it:
        for ahead in it:
            ahead.read(ahead.item)


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
    ap.add_argument("--server", choices=("keepalive", "moto"), default="keepalive",
                    help="keepalive: moto's S3 app, HTTP/1.1 keep-alive; moto: moto_server as shipped")
    ap.add_argument("--reader", choices=("async", "threads"), default="async",
                    help="async: S3 reads as coroutines on s3fs's loop (as ingest does); threads: the thread pool "
                         "calling the sync read (ingest before core/io/remote.py), for comparison")
    a = ap.parse_args()

    import s3fs

    import core.io.ingest
    from core.io.ingest import IngestConfig, ingest

    if a.reader == "threads":
        core.io.ingest.async_image_reader = lambda *args: None  # read_ahead falls back to its thread pool
    proc, url = start_server(a.server)
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
        names = [f"{i:06d}.jpg" for i in range(a.n)]
        warm = work / "warm.jsonl"
        warm.write_text("".join(src.read_text().splitlines(keepends=True)[:20]))
        ingest(IngestConfig(source=str(warm), image_root=root, run_dir=str(work / "warm"), image_readers=a.readers))
        meter = Meter(proc.pid)
        print(f"{a.n} images of {a.px}x{a.px} px, S3 server: {a.server} ({url}), reader: {a.reader}, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        with meter:
            read_ceiling(fs, root, names, a.readers, a.reader == "async")
        print(f"  ceiling, no added latency: reads alone, {a.readers} readers   {meter.line(a.n)}")
        with meter:
            ingest(IngestConfig(source=str(src), image_root=root, run_dir=str(work / "nolatency"),
                                image_readers=a.readers))
        print(f"  ceiling, no added latency: ingest, image_readers={a.readers:<3}  {meter.line(a.n)}", flush=True)
        cap = a.n / meter.wall
        state["seconds"] = a.latency
        rate, outs, cpu = {}, {}, {}
        for readers in (1, a.readers):
            state["calls"].clear()
            with meter:
                res = ingest(IngestConfig(source=str(src), image_root=root, run_dir=str(work / f"run{readers}"),
                                          image_readers=readers))
            assert res.n_kept == a.n, res.summary()
            rate[readers], cpu[readers] = a.n / meter.wall, (meter.client / a.n, meter.server / a.n)
            outs[readers] = _outputs(work / f"run{readers}")
            print(f"  +{a.latency * 1000:.0f} ms per request: ingest, image_readers={readers:<3} {meter.line(a.n)}  "
                  f"S3 requests: {dict(sorted(state['calls'].items()))}", flush=True)
        per_read = max(1, round(sum(state["calls"].values()) / a.n))  # S3 requests per image read
        c, s = (x * 1000 for x in cpu[a.readers])
        print(f"  serial: {1000 / rate[1]:.1f} ms per image ({per_read} x {a.latency * 1000:.0f} ms injected); "
              f"concurrent: {1000 / rate[a.readers]:.2f} ms per image, where the CPU allows "
              f"{1000 / max(c, s, (c + s) / (os.cpu_count() or 1)):.0f} images/s (client <= 1 core: its GIL; server; "
              f"both on {os.cpu_count()} cores) and the no-latency ingest ran at {cap:.0f}")
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
    print(f"  load average after: {os.getloadavg()[0]:.1f}")
    print(f"speedup: {rate[a.readers] / rate[1]:.1f}x")


if __name__ == "__main__":
    main()
