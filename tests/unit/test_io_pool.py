"""Concurrent image reads (core/io/pool.py) and ingest with them: order, errors at the point the serial read
raised them, a bounded number of reads in flight, and ingest output byte-identical with 1 or 16 readers on a
local and an S3 image root."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from PIL import Image

from core.io.ingest import IngestConfig, ingest
from core.io.pool import AsyncRead, read_ahead


class Recorder:
    """A read function that records the reads in flight (max) and which names were read."""

    def __init__(self, delay: float = 0.002):
        self.delay, self.lock = delay, threading.Lock()
        self.now = self.max = 0
        self.read_names: list[str] = []

    def __call__(self, name: str) -> bytes:
        with self.lock:
            self.now += 1
            self.max = max(self.max, self.now)
            self.read_names.append(name)
        try:
            time.sleep(self.delay)
            if name.startswith("missing"):
                raise FileNotFoundError(name)
            return name.encode()
        finally:
            with self.lock:
                self.now -= 1


class AsyncRecorder(Recorder):
    """The same reads as coroutines on an event loop running in its own thread (as fsspec's filesystem loop)."""

    def __init__(self, delay: float = 0.002):
        super().__init__(delay)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cancelled = 0

    async def aread(self, name: str) -> bytes:
        assert threading.current_thread() is self.thread
        with self.lock:
            self.now += 1
            self.max = max(self.max, self.now)
            self.read_names.append(name)
        try:
            await asyncio.sleep(self.delay)
            if name.startswith("missing"):
                raise FileNotFoundError(name)
            return name.encode()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            with self.lock:
                self.now -= 1

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture()
def arec():
    rec = AsyncRecorder()
    try:
        yield rec
    finally:
        rec.close()


def _prepare(item: int):
    if item % 10 == 7:
        raise ValueError(f"bad item {item}")
    return item * 2, [f"{item}-a", f"{item}-b", "missing" if item % 10 == 3 else f"{item}-a"]


@pytest.mark.parametrize("workers,on_loop", [(1, False), (4, False), (4, True)])
def test_read_ahead_keeps_order_and_raises_where_the_serial_read_did(workers, on_loop, arec):
    rec = arec if on_loop else Recorder()
    aread = AsyncRead(arec.aread, arec.loop) if on_loop else None
    seen = []
    for ahead in read_ahead(range(30), _prepare, rec, max_workers=workers, window=6, aread=aread):
        try:
            value = ahead.prepared()
        except ValueError as e:
            seen.append((ahead.item, "prepare", str(e)))
            continue
        got = []
        try:
            for name in _prepare(ahead.item)[1]:
                got.append(ahead.read(name))
        except FileNotFoundError as e:
            got.append(f"missing:{e}")
        seen.append((ahead.item, value, got))
    assert [s[0] for s in seen] == list(range(30))
    assert seen[7] == (7, "prepare", "bad item 7")
    assert seen[3] == (3, 6, [b"3-a", b"3-b", "missing:missing"])
    assert seen[4] == (4, 8, [b"4-a", b"4-b", b"4-a"])
    assert rec.max <= workers
    if workers == 1:  # serial: only what the consumer asked for, in its order (4-a twice: no pool, no dedup)
        assert rec.read_names[:3] == ["0-a", "0-b", "0-a"]
    else:  # a name listed twice in one item is read once
        assert sorted(rec.read_names).count("4-a") == 1


def test_read_ahead_reads_a_bounded_window_and_stops_on_close():
    rec = Recorder(delay=0.01)
    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    it = read_ahead(items(), lambda i: (i, [f"{i}"]), rec, max_workers=4, window=8)
    with closing(it):
        first = next(it)
        assert first.read("0") == b"0"
        assert len(pulled) <= 10  # the first item + the window, never the whole source
    assert len(rec.read_names) <= 10 and rec.now == 0  # queued reads cancelled, running ones finished


def test_read_ahead_on_a_loop_reads_a_bounded_window_and_cancels_on_close(arec):
    arec.delay = 0.05
    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    it = read_ahead(items(), lambda i: (i, [f"{i}"]), Recorder(), max_workers=4, window=8,
                    aread=AsyncRead(arec.aread, arec.loop))
    with closing(it):
        first = next(it)
        assert first.read("0") == b"0"
        assert len(pulled) <= 10  # the first item + the window, never the whole source
        assert arec.max <= 4  # at most max_workers reads in flight on the loop
    # on close: queued reads never start, started ones are cancelled and have ended
    assert arec.now == 0 and 1 <= arec.cancelled <= 4 and len(arec.read_names) <= 10


def test_read_ahead_with_aread_uses_read_for_one_worker_and_refuses_its_own_loop(arec):
    sync = Recorder()
    got = [a.read(f"{a.item}") for a in read_ahead(range(3), lambda i: (i, [f"{i}"]), sync, max_workers=1,
                                                   aread=AsyncRead(arec.aread, arec.loop))]
    assert got == [b"0", b"1", b"2"] and sync.read_names == ["0", "1", "2"] and arec.read_names == []

    async def on_the_loop():
        return list(read_ahead(range(3), lambda i: (i, [f"{i}"]), sync, max_workers=4,
                               aread=AsyncRead(arec.aread, arec.loop)))

    with pytest.raises(RuntimeError, match="must not run on aread.loop"):
        asyncio.run_coroutine_threadsafe(on_the_loop(), arec.loop).result(5)


def test_read_ahead_refuses_zero_workers():
    with pytest.raises(ValueError, match="max_workers=0 out of range"):
        list(read_ahead([1], lambda i: (i, []), lambda n: b"", max_workers=0))


# ------------------------------------------------------------------------------------------------ ingest
def _img(color, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format=fmt)
    return buf.getvalue()


def _conv(q="<image>\nWhat color?", a="Red."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


FILES = {"a.jpg": _img((255, 0, 0)), "sub/b.png": _img((0, 255, 0), "PNG"), "bad.jpg": b"garbage"}
FILES |= {f"many/{i}.jpg": _img((i * 9 % 256, 30, 60)) for i in range(40)}
RECORDS = [
    {"id": "a", "image": "a.jpg", "conversations": _conv()},
    {"id": "multi", "image": ["a.jpg", "sub/b.png"], "conversations": _conv("<image>\n<image>\nCompare.", "x")},
    {"id": "text", "conversations": _conv("What is 2+2?", "4.")},
    {"id": "missing", "image": "nope.jpg", "conversations": _conv()},
    {"id": "corrupt", "image": "bad.jpg", "conversations": _conv()},
    {"id": "escape", "image": "../../etc/passwd", "conversations": _conv()},
    {"id": "a", "image": "sub/b.png", "conversations": _conv()},  # duplicate id: its image is never decided on
    {"id": "dir", "image": "sub", "conversations": _conv()},
    # the first image is corrupt and the second missing: the serial read decided corrupt_image, and so must this
    {"id": "first_error", "image": ["bad.jpg", "gone.jpg"], "conversations": _conv("<image>\n<image>\nQ?", "A.")},
    {"id": "count", "image": "a.jpg", "conversations": _conv("no placeholder", "x")},
    {"id": "twice", "image": ["a.jpg", "a.jpg"], "conversations": _conv("<image>\n<image>\nSame?", "Yes.")},
] + [{"id": f"m{i}", "image": f"many/{i}.jpg", "conversations": _conv()} for i in range(40)]


def _outputs(run: Path) -> dict[str, bytes]:
    """Every file ingest wrote (ledger, shards, accounting), the manifest without its timing and run folder."""
    out = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    manifest = json.loads(out.pop("shards/manifest.json").replace(str(run).encode(), b"RUN"))
    manifest["summary"].pop("seconds")
    out["shards/manifest.json"] = json.dumps(manifest).encode()
    return out


def _ingest_with_1_and_16_readers(src, image_root: str, tmp_path):
    """Ingest `src` with 1 and with 16 image readers; assert the outputs are byte-identical; the ingest ledger."""
    runs = {}
    for readers in (1, 16):
        run = tmp_path / f"run{readers}"
        ingest(IngestConfig(source=str(src), image_root=image_root, run_dir=str(run), shard_max_samples=7,
                            image_readers=readers))
        runs[readers] = _outputs(run)
    assert runs[1] == runs[16]
    return __import__("pandas").read_parquet(io.BytesIO(runs[16]["ledger/ingest/part-ingest.parquet"]))


def test_ingest_output_is_byte_identical_with_1_and_16_readers(tmp_path):
    img = tmp_path / "images"
    for name, data in FILES.items():
        (img / name).parent.mkdir(parents=True, exist_ok=True)
        (img / name).write_bytes(data)
    src = tmp_path / "d.json"
    src.write_text(json.dumps(RECORDS))
    led = _ingest_with_1_and_16_readers(src, str(img), tmp_path)
    reasons = dict(zip(led.sample_id, led.reason))
    assert reasons["first_error"] == "corrupt_image" and reasons["a#dup6"] == "duplicate_id"
    assert reasons["dir"] == "missing_image" and reasons["escape"] == "unsafe_path"
    assert (led.decision == "keep").sum() == 44


def test_ingest_from_s3_images_is_byte_identical_with_1_and_16_readers(tmp_path, moto_s3, monkeypatch):
    import fsspec

    import core.io.ingest
    import core.io.remote

    on_loop = []  # the 16-reader run reads on s3fs's loop (core/io/remote.py), the 1-reader run with the sync read
    real = core.io.remote.read_object

    async def counted(*args):
        on_loop.append(args[2])
        return await real(*args)

    monkeypatch.setattr(core.io.remote, "read_object", counted)
    fs = fsspec.filesystem("s3")
    root = f"s3://{moto_s3.bucket}/images"
    for name, data in FILES.items():
        fs.pipe(f"{root}/{name}", data)
    src = tmp_path / "d.json"
    src.write_text(json.dumps(RECORDS))
    led = _ingest_with_1_and_16_readers(src, root, tmp_path)
    reasons = dict(zip(led.sample_id, led.reason))
    # a name that is only a prefix ("folder") of other objects is a missing image, as a folder is locally
    assert reasons["dir"] == "missing_image" and reasons["first_error"] == "corrupt_image"
    assert "nope.jpg" in on_loop and "many/39.jpg" in on_loop and "sub" in on_loop


def test_s3_reads_on_the_loop_decide_as_the_sync_read(tmp_path, moto_s3):
    """Every outcome of ingest's sync remote read, and its async twin, on the same objects: bytes, missing,
    a folder, an empty object (a refused range), oversize by one byte, exactly max_bytes, an unsafe name."""
    from functools import partial

    import fsspec
    from fsspec.asyn import sync

    from core.foundation.sample import SampleError
    from core.io.ingest import _read_image, _safe_image_path
    from core.io.remote import async_image_reader

    fs = fsspec.filesystem("s3")
    root = f"s3://{moto_s3.bucket}/img"
    objects = {"ok.jpg": b"x" * 10, "max.jpg": b"y" * 16, "over.jpg": b"z" * 17, "empty.jpg": b"", "dir/a.jpg": b"a"}
    for name, data in objects.items():
        fs.pipe(f"{root}/{name}", data)
    aread = async_image_reader(fs, partial(_safe_image_path, root), 16)
    assert aread is not None and aread.loop is fs.loop

    def outcome(fn, name):
        try:
            return fn(name)
        except SampleError as e:
            return (e.reason, e.detail)

    for name in [*objects, "gone.jpg", "dir", "../x.jpg"]:
        want = outcome(partial(_read_image, fs, root, False, 16), name)
        assert outcome(lambda n: sync(fs.loop, aread.fn, n), name) == want, name
    assert outcome(lambda n: sync(fs.loop, aread.fn, n), "over.jpg")[0] == "oversize_image"
    assert outcome(lambda n: sync(fs.loop, aread.fn, n), "dir")[0] == "missing_image"
    assert async_image_reader(fsspec.filesystem("memory"), str, 16) is None  # not async: the thread pool reads it


def test_image_readers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="image_readers=0 out of range"):
        IngestConfig(source="x.json", image_root="", run_dir=str(tmp_path), image_readers=0)
