"""Ingest: LLaVA-style JSON array or JSONL + an image folder -> WebDataset shards + the ingest ledger.

Streaming: a JSON array is parsed item by item with ijson, JSONL line by line, so a 20 GB file is
never loaded whole. Shard assignment is sequential in input order (deterministic). Every input
record gets exactly one ledger row: keep (with its shard) or quarantine (with a reason).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import PurePosixPath
from typing import Any

import fsspec
import fsspec.implementations.local

from core.images import DEFAULT_MAX_PIXELS, decode_image
from core.io_pool import read_ahead
from core.ledger import LedgerWriter, step_dir
from core.sample import MAX_TEXT_CHARS, Sample, SampleError
from core.sources import DEFAULT_CAPTION_PROMPT, count_records, iter_source, parse_format
from core.wds import ShardInfo, ShardWriter

log = logging.getLogger(__name__)
STEP = "ingest"


@dataclass
class IngestConfig:
    """How to turn a LLaVA JSON/JSONL + image folder into shards.

    `source` is a file, folder or glob (path/URL) of one container: JSON array, JSONL, WebDataset shards
    or Parquet; records are LLaVA or `messages` (ShareGPT) dialect (core/sources.py); `format` forces
    either ("auto", "jsonl", "wds:messages", ...). `image_root` is the folder that the records' image
    names are relative to (unused for images carried inline by WDS/Parquet); `run_dir` receives
    `shards/` and `ledger/ingest/`.
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
    format: str = "auto"
    caption_prompt: str = DEFAULT_CAPTION_PROMPT  # question of caption-only WDS samples (image + .txt)
    image_readers: int = 16  # threads reading image_root files ahead (core/io_pool.py); 1 = one after another

    def __post_init__(self) -> None:
        parse_format(self.format)  # ValueError on an unknown format, before any work
        if self.image_readers < 1:
            raise ValueError(f"image_readers={self.image_readers} out of range; valid: [1, inf)")


@dataclass
class IngestResult:
    shards: list[ShardInfo]
    n_records: int
    n_kept: int
    n_quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    source_records: int = -1  # counted from the source bytes, independently of the parser

    def summary(self) -> dict[str, Any]:
        return {
            "source_records": self.source_records,
            "records": self.n_records,
            "kept": self.n_kept,
            "quarantined": self.n_quarantined,
            "shards": len(self.shards),
            "reasons": dict(sorted(self.reasons.items())),
            "seconds": round(self.seconds, 2),
        }


def _safe_image_path(root: str, name: str, local: bool = False) -> str:
    """`root/name`, refusing names that leave the root: absolute, `..`, or (local roots) a symlink whose
    real path lies outside the real root -> SampleError(unsafe_path)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise SampleError("unsafe_path", f"image name {name!r} escapes the image root")
    path = f"{root.rstrip('/')}/{p.as_posix()}"
    if local:
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise SampleError("unsafe_path", f"image {name!r} resolves outside the image root (symlink)")
    return path


def _read_image(fs: fsspec.AbstractFileSystem, root: str, local: bool, name: str) -> bytes:
    """The bytes of image `name` under `root` (runs in the read-ahead pool): SampleError(unsafe_path) for a name
    leaving the root, SampleError(missing_image) when there is no such file. A whole-object read (`cat_file`):
    on an object store a name that is only a folder prefix is a missing file, where open + read returned b""."""
    path = _safe_image_path(root, name, local)
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise SampleError("missing_image", f"{name}: {type(e).__name__}") from None


def _parse_ahead(cfg: IngestConfig, src_name: str, r: Any) -> tuple[Sample | None, list[str]]:
    """A source record's Sample (parsed ahead of its turn) and the image names the pool can start reading."""
    if r.problem:
        return None, []
    s = Sample.from_record(r.record, source=src_name, max_text_chars=cfg.max_text_chars)
    return s, (s.images if r.image_bytes is None and cfg.image_root else [])


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


class SourceAccountingError(AssertionError):
    """Ingest wrote a different number of ledger rows than the source holds records."""


ACCOUNTING_FILE = "source_accounting.json"


def read_source_accounting(ingest_ledger_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The source accounting ingest wrote next to its ledger (None for runs ingested before it existed)."""
    p = os.path.join(ingest_ledger_dir, ACCOUNTING_FILE)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def ingest(cfg: IngestConfig, progress_every: int = 5000) -> IngestResult:
    """Ingest `cfg.source` into `cfg.run_dir/shards` and write `ledger/ingest/part-ingest.parquet`.

    The source's records are first counted per file without the parser (`core.sources.count_records`);
    after the run, ledger rows must equal that count per file (`source_accounting.json` next to the
    ledger), else SourceAccountingError: a record is never lost silently.
    """
    t0 = time.time()
    src_name = cfg.source_name or PurePosixPath(cfg.source.rstrip("/")).stem
    fs_img, _ = fsspec.core.url_to_fs(cfg.image_root or ".")
    local_img = isinstance(fs_img, fsspec.implementations.local.LocalFileSystem)
    counted = count_records(cfg.source, cfg.format)  # validates the containers before any work
    log.info("ingest: %d records counted in %d file(s) of %s", sum(counted.values()), len(counted), cfg.source)
    rows: dict[str, int] = {f: 0 for f in counted}
    n = 0
    led_dir = step_dir(cfg.ledger_dir or cfg.run_dir, STEP)
    writer = ShardWriter(f"{cfg.run_dir.rstrip('/')}/shards", cfg.prefix, cfg.shard_max_samples, cfg.shard_max_bytes)
    records = read_ahead(iter_source(cfg.source, cfg.format, cfg.caption_prompt), partial(_parse_ahead, cfg, src_name),
                         partial(_read_image, fs_img, cfg.image_root, local_img), cfg.image_readers)
    with LedgerWriter(led_dir / "part-ingest.parquet", STEP) as led, closing(records):
        for ahead in records:
            r = ahead.item
            n += 1
            rows[r.file] = rows.get(r.file, 0) + 1
            idx = r.index
            stem = PurePosixPath(r.file).stem if len(counted) > 1 else src_name
            fallback = r.fallback_id or f"{stem}#{idx}"
            rec = r.record
            rid = str(rec["id"]) if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) else fallback
            try:
                if r.problem:
                    raise SampleError(*r.problem)
                s = ahead.prepared()  # Sample.from_record(rec, ...), run ahead of time
                rid = s.id
                if rid in led.decided:
                    raise SampleError("duplicate_id", f"id {rid!r} seen earlier (the first one in file order is kept)")
                if r.image_bytes is not None:
                    data = list(r.image_bytes)
                    for b in data:
                        decode_image(b, cfg.max_image_pixels)
                else:
                    if s.images and not cfg.image_root:
                        raise SampleError("missing_image", "the record names images but no image_root was given")
                    data = []
                    for name in s.images:  # read ahead by the pool; errors raised here, in order
                        data.append(ahead.read(name))
                        decode_image(data[-1], cfg.max_image_pixels)
                s.image_bytes = data
                shard = writer.write(s)
                led.add(rid, "keep", shard=shard)
            except SampleError as e:
                if rid in led.decided:
                    rid = f"{rid}#dup{idx}" if len(counted) == 1 else f"{rid}#dup@{stem}:{idx}"  # keep the ledger keyed uniquely; the reason says why
                log.warning("quarantine %s: %s", rid, e)
                led.add(rid, "quarantine", e.reason, detail=e.detail[:500], **r.position)
            if progress_every and n % progress_every == 0:
                log.info("ingest: %d records, %d kept, %.0f rec/s", n, led.counts["keep"], n / (time.time() - t0))
        shards = writer.close()
        counts, reasons = dict(led.counts), dict(led.reasons)
    res = IngestResult(shards, n, counts["keep"], counts["quarantine"], reasons, time.time() - t0,
                       source_records=sum(counted.values()))
    per_file = [{"file": f, "source_records": c, "ledger_rows": rows.get(f, 0)} for f, c in counted.items()]
    accounting = {
        "source": cfg.source, "format": cfg.format, "files": per_file,
        "source_records": res.source_records, "ledger_rows": n, "kept": res.n_kept, "quarantined": res.n_quarantined,
        "balanced": all(p["source_records"] == p["ledger_rows"] for p in per_file) and n == res.n_kept + res.n_quarantined,
    }
    with open(led_dir / ACCOUNTING_FILE, "w") as f:
        json.dump(accounting, f, indent=1)
    manifest = {
        "source": cfg.source,
        "summary": res.summary(),
        "shards": [{"path": s.path, "n_samples": s.n_samples, "n_bytes": s.n_bytes, "sha256": s.sha256} for s in shards],
    }
    with fsspec.open(f"{cfg.run_dir.rstrip('/')}/shards/manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
    if not accounting["balanced"]:
        bad = [p for p in per_file if p["source_records"] != p["ledger_rows"]]
        raise SourceAccountingError(f"ingest wrote {n} ledger rows for {res.source_records} source records: {bad}")
    log.info("ingest done: %s", res.summary())
    return res
