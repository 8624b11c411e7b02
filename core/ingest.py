"""Ingest: LLaVA-style JSON array or JSONL + an image folder -> WebDataset shards + the ingest ledger.

Streaming: a JSON array is parsed item by item with ijson, JSONL line by line, so a 20 GB file is
never loaded whole. Shard assignment is sequential in input order (deterministic). Every input
record gets exactly one ledger row: keep (with its shard) or quarantine (with a reason).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import fsspec.implementations.local
import ijson

from core.images import DEFAULT_MAX_PIXELS, decode_image
from core.ledger import LedgerWriter, step_dir
from core.sample import MAX_TEXT_CHARS, Sample, SampleError
from core.wds import ShardInfo, ShardWriter

log = logging.getLogger(__name__)
STEP = "ingest"


@dataclass
class IngestConfig:
    """How to turn a LLaVA JSON/JSONL + image folder into shards.

    `source` is a .json (array) or .jsonl file path/URL; `image_root` the folder that the records'
    `image` names are relative to; `run_dir` receives `shards/` and `ledger/ingest/`.
    """

    source: str
    image_root: str
    run_dir: str
    shard_max_samples: int = 1000
    shard_max_bytes: int = 256 << 20
    prefix: str = "shard"
    max_text_chars: int = MAX_TEXT_CHARS
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    source_name: str = ""  # value for Sample.source when records carry none (default: file stem)
    ledger_dir: str = ""  # local run dir for the ledger when run_dir is remote (default: run_dir)


@dataclass
class IngestResult:
    shards: list[ShardInfo]
    n_records: int
    n_kept: int
    n_quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.n_records,
            "kept": self.n_kept,
            "quarantined": self.n_quarantined,
            "shards": len(self.shards),
            "reasons": dict(sorted(self.reasons.items())),
            "seconds": round(self.seconds, 2),
        }


def _iter_records(source: str) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    """Yield (index, record or None, problem) from a JSON array or JSONL, streaming."""
    if source.endswith(".jsonl"):
        with fsspec.open(source, "rb") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield i, None, ("non_utf8", str(e))
                    continue
                try:
                    yield i, json.loads(text), None
                except json.JSONDecodeError as e:
                    yield i, None, ("invalid_json", str(e))
        return
    i = -1
    with fsspec.open(source, "rb") as f:
        try:
            for i, rec in enumerate(ijson.items(f, "item", use_float=True)):
                yield i, rec, None
        except (ijson.JSONError, UnicodeDecodeError, ValueError) as e:
            # The rest of a broken JSON array is unreadable; record the break itself.
            yield i + 1, None, ("invalid_json", f"JSON array unreadable from item {i + 1}: {e}")


def _safe_image_path(root: str, name: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise SampleError("unsafe_path", f"image name {name!r} escapes the image root")
    return f"{root.rstrip('/')}/{p.as_posix()}"


def source_fingerprint(*urls: str, max_entries: int = 10_000) -> str:
    """A cheap change detector for cache keys (sha256 hex): a cached step keyed only by a path string would
    silently return stale results after the data at that path changed.

    Per URL: a file contributes its size and modification time (or ETag/version on object stores); a local
    folder its own mtime plus name, size and mtime of up to `max_entries` of its top-level entries (adding,
    removing or replacing files changes it); a remote folder only its path (object stores have no folder
    mtime and listing millions of images costs minutes: use versioned prefixes there). Empty URLs are skipped.
    """
    import hashlib
    import itertools
    import os

    h = hashlib.sha256()
    for url in urls:
        if not url:
            continue
        h.update(url.encode() + b"\0")
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            h.update(b"missing\0")
            continue
        if not fs.isdir(path):
            info = fs.info(path)
            keys = ("size", "mtime", "LastModified", "ETag", "etag", "VersionId", "generation", "md5Hash")
            h.update(json.dumps({k: str(info[k]) for k in keys if k in info}, sort_keys=True).encode())
        elif isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            st = os.stat(path)
            h.update(f"{st.st_mtime_ns}:{st.st_ino}".encode())
            with os.scandir(path) as it:
                entries = sorted(itertools.islice(it, max_entries), key=lambda e: e.name)
                for e in entries:
                    est = e.stat(follow_symlinks=False)
                    h.update(f"{e.name}:{est.st_size}:{est.st_mtime_ns}\0".encode())
        h.update(b"\1")
    return h.hexdigest()


def ingest(cfg: IngestConfig, progress_every: int = 5000) -> IngestResult:
    """Ingest `cfg.source` into `cfg.run_dir/shards` and write `ledger/ingest/part-ingest.parquet`."""
    t0 = time.time()
    src_name = cfg.source_name or PurePosixPath(cfg.source).stem
    fs_img, _ = fsspec.core.url_to_fs(cfg.image_root)
    n = 0
    writer = ShardWriter(f"{cfg.run_dir.rstrip('/')}/shards", cfg.prefix, cfg.shard_max_samples, cfg.shard_max_bytes)
    with LedgerWriter(step_dir(cfg.ledger_dir or cfg.run_dir, STEP) / "part-ingest.parquet", STEP) as led:
        for idx, rec, problem in _iter_records(cfg.source):
            n += 1
            fallback = f"{src_name}#{idx}"
            rid = str(rec["id"]) if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) else fallback
            try:
                if problem:
                    raise SampleError(*problem)
                s = Sample.from_record(rec, source=src_name, max_text_chars=cfg.max_text_chars)
                rid = s.id
                if rid in led.decided:
                    raise SampleError("duplicate_id", f"id {rid!r} seen earlier in {cfg.source}")
                data = []
                for name in s.images:
                    path = _safe_image_path(cfg.image_root, name)
                    try:
                        with fs_img.open(path, "rb") as f:
                            data.append(f.read())
                    except (FileNotFoundError, IsADirectoryError) as e:
                        raise SampleError("missing_image", f"{name}: {type(e).__name__}") from None
                    decode_image(data[-1], cfg.max_image_pixels)
                s.image_bytes = data
                shard = writer.write(s)
                led.add(rid, "keep", shard=shard)
            except SampleError as e:
                if rid in led.decided:
                    rid = f"{rid}#dup{idx}"  # keep the ledger keyed uniquely; the reason says why
                log.warning("quarantine %s: %s", rid, e)
                led.add(rid, "quarantine", e.reason, detail=e.detail[:500], record_index=idx)
            if progress_every and n % progress_every == 0:
                log.info("ingest: %d records, %d kept, %.0f rec/s", n, led.counts["keep"], n / (time.time() - t0))
        shards = writer.close()
        counts, reasons = dict(led.counts), dict(led.reasons)
    res = IngestResult(shards, n, counts["keep"], counts["quarantine"], reasons, time.time() - t0)
    manifest = {
        "source": cfg.source,
        "summary": res.summary(),
        "shards": [{"path": s.path, "n_samples": s.n_samples, "n_bytes": s.n_bytes, "sha256": s.sha256} for s in shards],
    }
    with fsspec.open(f"{cfg.run_dir.rstrip('/')}/shards/manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
    log.info("ingest done: %s", res.summary())
    return res
