"""Per-shard embedding: the body of one Ray actor (also usable in-process).

One shard is read, decoded and preprocessed by a reader thread plus `cfg.decode_workers` threads
(PIL decode/resize and torch ops release the GIL) while the calling thread runs the model on the
previous batch, so the model waits only when the CPU side is slower than the forward pass. Images are
batched in shard order in fixed chunks of `batch_size`, so the output does not depend on which actor
embeds a shard or on timing: re-runs give byte-identical files.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.foundation.ledger import LedgerWriter
from core.foundation.sample import Sample, SampleError
from core.steps.embed.config import EmbedConfig
from core.steps.embed.preprocess import BatchPreprocess
from core.steps.embed.store import build_table, table_bytes

log = logging.getLogger(__name__)

STEP = "embed"
_END = object()


@dataclass
class ShardResult:
    """What an actor returns for one shard: the two files' bytes (the driver writes them) and stats."""

    shard: str
    embeddings: bytes
    ledger: bytes
    stats: dict[str, Any] = field(default_factory=dict)


class _QueueSink:
    """Quarantine sink for the reader thread: rows travel through the sample queue so that one thread
    writes the ledger, in shard order."""

    def __init__(self, put: Any):
        self.put = put

    def add(self, sample_id: str, decision: str, reason: str = "", score: float | None = None, shard: str = "",
            **extra: Any) -> None:
        self.put(("ledger", sample_id, decision, reason, shard, extra))


class _Cancelled(Exception):
    pass


class _ShardReader:
    """The reader thread of one shard: streams its samples (`core.io.wds.iter_shard`), submits each one's
    decode to the worker's pool and queues (sample, future) and ledger rows in shard order, at most
    `maxsize` ahead of the consumer. A reader chained with `chain(next)` starts `next` once it has queued
    everything, so the next shard is read and decoded while this one's last batches run and its files
    are written (the pool runs decodes in submission order: this shard's first).

    The reader stays only a few samples ahead of the decoders (`ahead`): tar parsing is pure Python and,
    run in one long stretch, would hold the GIL for whole switch intervals (5 ms) each time a decode
    thread or the model's thread (between torch ops) wants it back; in short bursts it never does."""

    def __init__(self, worker: ShardEmbedWorker, url: str, include: Collection[str] | None, maxsize: int):
        from core.io.wds import shard_name

        self.worker, self.url, self.include = worker, url, include
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.ahead = threading.Semaphore(2 * worker.cfg.decode_workers + 2)  # samples submitted, not decoded
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"read-{shard_name(url)}")
        self._lock = threading.Lock()
        self._started = self._finished = False
        self._then: _ShardReader | None = None

    def start(self) -> _ShardReader:
        with self._lock:
            if not (self._started or self.cancelled.is_set()):
                self._started = True
                self.thread.start()
        return self

    def chain(self, nxt: _ShardReader) -> None:
        """Start `nxt` when this reader has queued its whole shard (at once if it already has)."""
        with self._lock:
            if not self._finished:
                self._then = nxt
                return
        nxt.start()

    def _put(self, item: Any) -> None:
        while True:
            if self.cancelled.is_set():
                raise _Cancelled
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        from core.io.wds import iter_shard

        w = self.worker
        try:
            for s in iter_shard(self.url, quarantine=_QueueSink(self._put), include_ids=self.include,
                                load_images=w.image is not None, verify_images=False):
                fut = None
                if w.image is not None and s.image_bytes:
                    while not self.ahead.acquire(timeout=0.2):
                        if self.cancelled.is_set():
                            raise _Cancelled
                    fut = w.pool.submit(w._prepare, s)
                    fut.add_done_callback(lambda _: self.ahead.release())  # also runs when cancelled
                self._put((s, fut))
            self._put(_END)
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the consuming thread, which re-raises it
            try:
                self._put(e)
            except _Cancelled:
                pass
        finally:
            with self._lock:
                self._finished = True
                nxt, self._then = self._then, None
            if nxt is not None and not self.cancelled.is_set():
                nxt.start()

    def cancel(self) -> None:
        """Stop reading (a prefetched shard that is not asked for next, or after a failure); drops what
        was queued. Idempotent."""
        with self._lock:
            self.cancelled.set()
            started = self._started
            nxt, self._then = self._then, None
        if nxt is not None:
            nxt.cancel()
        if not started:
            return
        while True:  # make room so that a blocked put sees the flag, then drop the rest
            try:
                item = self.q.get(timeout=0.05)
            except queue.Empty:
                if not self.thread.is_alive():
                    break
                continue
            if isinstance(item, tuple) and len(item) == 2 and item[1] is not None:
                item[1].cancel()
        self.thread.join()


def input_side(preprocess: Any) -> int:
    """Largest side the model's preprocessing resizes to (its Resize/CenterCrop size), 0 if unknown."""
    sides = []
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            sides.append(size)
        elif isinstance(size, (tuple, list)) and size:
            sides.append(max(int(v) for v in size))
    return max(sides, default=0)


def decode_for_model(data: bytes, side: int) -> Any:
    """`core.io.images.decode_image` (same checks and reasons) with JPEG draft decoding at the model's side:
    the model resizes to `side` anyway, and this makes decode + resize of large photos several times cheaper."""
    from core.io.images import decode_image

    return decode_image(data, draft_side=side)


class ShardEmbedWorker:
    """Builds the embedders once, then embeds whole shards (`embed_shard`). Wrapped by `ray.remote` in
    `embed_shards`; plain object in tests and benchmarks."""

    def __init__(self, cfg: EmbedConfig):
        import torch

        from core.steps.embed.model import SigLIP2ImageEmbedder, SigLIP2TextEmbedder

        self.cfg = cfg
        if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
            torch.set_num_threads(cfg.cpus_per_actor)
        self.image = SigLIP2ImageEmbedder(cfg) if cfg.embeds_images else None
        self.text = SigLIP2TextEmbedder(cfg) if cfg.embeds_texts else None
        self.pool = ThreadPoolExecutor(cfg.decode_workers, thread_name_prefix="embed-decode")
        self.pid = os.getpid()
        self.draft_side = input_side(self.image.lm.preprocess) if self.image is not None and cfg.jpeg_draft else 0
        # the model's preprocessing as per-image PIL stage + per-batch tensor stage (bit-identical), or None
        self.batcher = BatchPreprocess.split(self.image.lm.preprocess) if self.image is not None else None
        self._dim: int | None = None
        self._next: _ShardReader | None = None  # reader of the prefetched next shard

    def ready(self) -> int:
        """Returns the process id once the model is loaded (lets the driver wait for all actors)."""
        return self.pid

    # ---- CPU side -------------------------------------------------------------------------------
    def _prepare(self, s: Sample) -> tuple[list[Any], float]:
        """Decode + preprocess all images of a sample; SampleError names the reason to quarantine.

        With a `batcher` only the PIL part of the preprocessing runs here (items are uint8 arrays); the
        tensor part runs once per batch in `embed_shard`."""
        t0 = time.perf_counter()
        out = []
        prep = self.batcher.image if self.batcher is not None else self.image.preprocess
        for i, data in enumerate(s.image_bytes):
            try:
                im = decode_for_model(data, self.draft_side)
            except SampleError as e:
                raise SampleError(e.reason, f"image {i}: {e.detail}") from None
            try:
                out.append(prep(im))
            except Exception as e:  # e.g. degenerate sizes: quarantined with the error, never a crash
                raise SampleError("preprocess_failed", f"image {i}: {type(e).__name__}: {e}") from None
        return out, time.perf_counter() - t0

    # ---- shard ----------------------------------------------------------------------------------
    def _reader(self, url: str, include: Collection[str] | None) -> _ShardReader:
        """The reader of `url`: the prefetched one when it is that shard with the same ids, else a new one."""
        nxt, self._next = self._next, None
        if nxt is not None and nxt.url == url and (nxt.include is include or nxt.include == include):
            return nxt
        if nxt is not None:
            nxt.cancel()
        return _ShardReader(self, url, include, self._queue_size()).start()

    def _queue_size(self) -> int:
        return max(2, self.cfg.prefetch_batches * self.cfg.batch_size)

    def embed_shard(self, url: str, include_ids: Collection[str] | None = None, expected: bool = False,
                    prefetch: tuple[str, Collection[str] | None] | None = None,
                    led: LedgerWriter | None = None) -> ShardResult:
        """Embed the samples of one shard (restricted to `include_ids` when given).

        The ledger rows go to `led` when given (the caller publishes it; `ShardResult.ledger` is then
        empty); otherwise to a temporary part whose bytes are returned (a Ray actor: the driver publishes).

        With `expected=True`, ids of `include_ids` that the shard does not yield (lost to a truncated tar)
        are quarantined as `missing_from_shard`, so every input of the step gets one ledger row.
        `prefetch=(next_url, next_include_ids)`: the shard the caller will most likely ask for next; it is
        read and decoded as soon as this shard has been read, and used if the next call asks for exactly
        that shard and ids (otherwise dropped). Results never depend on it.
        """
        if led is not None:
            return self._embed_shard(url, include_ids, expected, prefetch, led)
        with tempfile.TemporaryDirectory(prefix="embed-ledger-") as td:
            with LedgerWriter(Path(td) / "part.parquet", STEP) as own:  # an error drops the half-written part
                res = self._embed_shard(url, include_ids, expected, prefetch, own)
            res.ledger = own.path.read_bytes()
        return res

    def _embed_shard(self, url: str, include_ids: Collection[str] | None, expected: bool,
                     prefetch: tuple[str, Collection[str] | None] | None, led: LedgerWriter) -> ShardResult:
        import torch

        from core.io.wds import shard_name

        cfg, name = self.cfg, shard_name(url)
        # a set the caller already holds (the previous step's ids, maybe millions) is used as is, not copied
        include = include_ids if include_ids is None or isinstance(include_ids, (set, frozenset)) else set(include_ids)
        t_start = time.perf_counter()
        reader = self._reader(url, include)
        if prefetch is not None:
            nxt_url, nxt_ids = prefetch
            self._next = _ShardReader(self, nxt_url, set(nxt_ids) if nxt_ids is not None else None,
                                      self._queue_size())
            reader.chain(self._next)
        q = reader.q

        rows: list[dict[str, Any]] = []
        img_pending: list[Any] = []
        img_vecs: list[np.ndarray] = []
        img_norms: list[np.ndarray] = []
        txt_pending: list[str] = []
        txt_vecs: list[np.ndarray] = []
        txt_norms: list[np.ndarray] = []
        st = {"forward_s": 0.0, "decode_s": 0.0, "wait_s": 0.0, "n_images": 0, "n_texts": 0}

        def flush_images(final: bool = False) -> None:
            while len(img_pending) >= cfg.batch_size or (final and img_pending):
                batch, img_pending[:] = img_pending[: cfg.batch_size], img_pending[cfg.batch_size:]
                t = time.perf_counter()
                pixels = self.batcher.batch(batch) if self.batcher is not None else torch.stack(batch)
                if self.image.lm.device.type == "cuda":
                    pixels = pixels.pin_memory()  # lets the host->GPU copy run asynchronously
                v, n = self.image.embed_pixels(pixels)
                st["forward_s"] += time.perf_counter() - t
                img_vecs.append(v)
                img_norms.append(n)

        def flush_texts(final: bool = False) -> None:
            while len(txt_pending) >= cfg.batch_size or (final and txt_pending):
                batch, txt_pending[:] = txt_pending[: cfg.batch_size], txt_pending[cfg.batch_size:]
                t = time.perf_counter()
                v, n = self.text.embed_tokens(self.text.tokenize(batch))
                st["forward_s"] += time.perf_counter() - t
                txt_vecs.append(v)
                txt_norms.append(n)

        met: set[str] = set()
        try:
            while True:
                t = time.perf_counter()
                item = q.get()
                st["wait_s"] += time.perf_counter() - t
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item[0] == "ledger":
                    _, sid, decision, reason, shard, extra = item
                    led.add(sid, decision, reason, shard=shard, **extra)
                    met.add(sid)
                    continue
                s, fut = item
                met.add(s.id)
                n_img = 0
                if fut is not None:
                    t = time.perf_counter()
                    try:
                        tensors, dt = fut.result()
                    except SampleError as e:
                        led.add(s.id, "quarantine", e.reason, shard=name, detail=e.detail[:500])
                        continue
                    finally:
                        st["wait_s"] += time.perf_counter() - t
                    st["decode_s"] += dt
                    n_img = len(tensors)
                    img_pending.extend(tensors)
                    flush_images()
                row = {"sample_id": s.id, "source": s.source, "n_images": n_img,
                       "image_start": st["n_images"]}
                st["n_images"] += n_img
                if self.text is not None:
                    txt_pending.append(s.text(cfg.text_view))
                    row["text_row"] = st["n_texts"]
                    st["n_texts"] += 1
                    flush_texts()
                rows.append(row)
                led.add(s.id, "keep", shard=name, n_images=n_img)
            flush_images(final=True)
            flush_texts(final=True)
            if expected and include is not None:
                for sid in sorted(include - met):
                    led.add(sid, "quarantine", "missing_from_shard", shard=name,
                            detail="expected input not found in shard (truncated or corrupt tar)")
        except BaseException:
            reader.cancel()
            if self._next is not None:
                self._next.cancel()
                self._next = None
            raise
        reader.thread.join()

        table = build_table(
            rows,
            image_vecs=np.concatenate(img_vecs) if img_vecs else None,
            image_norms=np.concatenate(img_norms) if img_norms else None,
            text_vecs=np.concatenate(txt_vecs) if txt_vecs else None,
            text_norms=np.concatenate(txt_norms) if txt_norms else None,
            cfg=cfg,
            dim=int((img_vecs or txt_vecs)[0].shape[1]) if (img_vecs or txt_vecs) else self.dim,
        )
        st.update(shard=name, n_kept=led.counts["keep"], n_quarantined=led.counts["quarantine"],
                  wall_s=time.perf_counter() - t_start, pid=self.pid, reasons=dict(led.reasons))
        return ShardResult(name, table_bytes(table), b"", st)

    @property
    def dim(self) -> int:
        """Output dimension of the model, probed once with a one-item forward (only empty shards need it)."""
        if self._dim is None:
            if self.text is not None:
                self._dim = int(self.text.embed_texts([""]).shape[1])
            else:
                from PIL import Image

                self._dim = int(self.image.embed_images([Image.new("RGB", (32, 32))]).shape[1])
        return self._dim
