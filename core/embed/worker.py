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

from core.embed.config import EmbedConfig
from core.embed.store import build_table, table_bytes
from core.ledger import LedgerWriter
from core.sample import Sample, SampleError

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

    def __init__(self, q: queue.Queue):
        self.q = q

    def add(self, sample_id: str, decision: str, reason: str = "", score: float | None = None, shard: str = "",
            **extra: Any) -> None:
        self.q.put(("ledger", sample_id, decision, reason, shard, extra))


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
    """`core.images.decode_image` (same checks and reasons) with JPEG draft decoding at the model's side:
    the model resizes to `side` anyway, and this makes decode + resize of large photos several times cheaper."""
    from core.images import decode_image

    return decode_image(data, draft_side=side)


class ShardEmbedWorker:
    """Builds the embedders once, then embeds whole shards (`embed_shard`). Wrapped by `ray.remote` in
    `embed_shards`; plain object in tests and benchmarks."""

    def __init__(self, cfg: EmbedConfig):
        import torch

        from core.embed.model import SigLIP2ImageEmbedder, SigLIP2TextEmbedder

        self.cfg = cfg
        if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
            torch.set_num_threads(cfg.cpus_per_actor)
        self.image = SigLIP2ImageEmbedder(cfg) if cfg.embeds_images else None
        self.text = SigLIP2TextEmbedder(cfg) if cfg.embeds_texts else None
        self.pool = ThreadPoolExecutor(cfg.decode_workers, thread_name_prefix="embed-decode")
        self.pid = os.getpid()
        self.draft_side = input_side(self.image.lm.preprocess) if self.image is not None and cfg.jpeg_draft else 0
        self._dim: int | None = None

    def ready(self) -> int:
        """Returns the process id once the model is loaded (lets the driver wait for all actors)."""
        return self.pid

    # ---- CPU side -------------------------------------------------------------------------------
    def _prepare(self, s: Sample) -> tuple[list[Any], float]:
        """Decode + preprocess all images of a sample; SampleError names the reason to quarantine."""
        t0 = time.perf_counter()
        out = []
        for i, data in enumerate(s.image_bytes):
            try:
                im = decode_for_model(data, self.draft_side)
            except SampleError as e:
                raise SampleError(e.reason, f"image {i}: {e.detail}") from None
            try:
                out.append(self.image.preprocess(im))
            except Exception as e:  # e.g. degenerate sizes: quarantined with the error, never a crash
                raise SampleError("preprocess_failed", f"image {i}: {type(e).__name__}: {e}") from None
        return out, time.perf_counter() - t0

    def _read(self, url: str, include: Collection[str] | None, q: queue.Queue) -> None:
        from core.wds import iter_shard

        try:
            for s in iter_shard(url, quarantine=_QueueSink(q), include_ids=include,
                                load_images=self.image is not None, verify_images=False):
                fut = self.pool.submit(self._prepare, s) if self.image is not None and s.image_bytes else None
                q.put((s, fut))
            q.put(_END)
        except BaseException as e:  # handed to the consuming thread, which re-raises it
            q.put(e)

    # ---- shard ----------------------------------------------------------------------------------
    def embed_shard(self, url: str, include_ids: Collection[str] | None = None, expected: bool = False) -> ShardResult:
        """Embed the samples of one shard (restricted to `include_ids` when given).

        With `expected=True`, ids of `include_ids` that the shard does not yield (lost to a truncated tar)
        are quarantined as `missing_from_shard`, so every input of the step gets one ledger row.
        """
        import torch

        from core.wds import shard_name

        cfg, name = self.cfg, shard_name(url)
        include = set(include_ids) if include_ids is not None else None
        t_start = time.perf_counter()
        q: queue.Queue = queue.Queue(maxsize=max(2, cfg.prefetch_batches * cfg.batch_size))
        reader = threading.Thread(target=self._read, args=(url, include, q), daemon=True, name=f"read-{name}")
        reader.start()

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
                pixels = torch.stack(batch)
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

        with tempfile.TemporaryDirectory(prefix="embed-ledger-") as td:
            led = LedgerWriter(Path(td) / "part.parquet", STEP)
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
                if not led.counts["keep"] and not led.counts["quarantine"]:
                    led.flush()  # an empty part still marks the shard done
                part = led.close()
            except BaseException as e:
                led.__exit__(type(e), e, None)  # drops the half-written part
                raise
            ledger_bytes = part.read_bytes()
        reader.join()

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
        return ShardResult(name, table_bytes(table), ledger_bytes, st)

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
