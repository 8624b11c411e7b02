"""Ingest: LLaVA-style JSON array or JSONL + an image folder -> WebDataset shards + the ingest ledger.

Streaming: a JSON array is parsed item by item with ijson, JSONL line by line, so a 20 GB file is
never loaded whole. Shard assignment is sequential in input order (deterministic). Every input
record gets exactly one ledger row: keep (with its shard) or quarantine (with a reason).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import time
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import PurePosixPath
from typing import Any

import fsspec
import fsspec.implementations.local

from core.foundation.configs import ConfigJSON, check_ranges, register_preset
from core.foundation.ledger import LedgerWriter, step_dir
from core.foundation.limits import (
    MAX_IMAGE_BYTES,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MAX_RECORD_BYTES,
    InputLimits,
    control_chars,
    printable,
)
from core.foundation.outputs import folder_lock, write_json_atomic
from core.foundation.sample import MAX_TEXT_CHARS, MAX_TURNS, Sample, SampleError
from core.io.images import DEFAULT_MAX_PIXELS, decode_image
from core.io.pool import read_ahead
from core.io.remote import async_image_reader
from core.io.sources import DEFAULT_CAPTION_PROMPT, count_records, iter_source, parse_format
from core.io.wds import ShardInfo, ShardWriter
from core.io.wds.reader import MAX_JSON_BYTES

log = logging.getLogger(__name__)
STEP = "ingest"


@dataclass
class IngestOptions(ConfigJSON):
    """The knobs of the ingest step (the `ingest_config` of a run; the source, its image root and its format are
    inputs of their own): how big the shards are and the bounds at the door (`IngestConfig` documents each).

    :param shard_max_samples: Most samples per output shard (the unit of every later step's fan-out and resume).
    :param shard_max_bytes: Most bytes (images + json + tar headers) per output shard.
    :param max_text_chars: Samples with more conversation text are quarantined (oversize_text).
    :param max_image_pixels: Images with more pixels are quarantined (decompression_bomb).
    :param max_image_bytes: Image files, tar members or Parquet cells larger than this are quarantined.
    :param image_readers: Threads reading images ahead (1 = one after another).
    """

    shard_max_samples: int = 1000
    shard_max_bytes: int = 256 << 20
    max_text_chars: int = MAX_TEXT_CHARS
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = MAX_IMAGE_BYTES
    image_readers: int = 16

    def __post_init__(self) -> None:
        check_ranges(self, {"shard_max_samples": (1, None), "shard_max_bytes": (1, None), "max_text_chars": (1, None),
                            "max_image_pixels": (1, None), "max_image_bytes": (1, None), "image_readers": (1, None)})

    def ingest_config(self, source: str, image_root: str, run_dir: str, format: str = "auto") -> IngestConfig:
        """The full `IngestConfig` of one call."""
        return IngestConfig(source=source, image_root=image_root, run_dir=run_dir, format=format,
                            **dataclasses.asdict(self))


@register_preset(IngestOptions, "default", default=True)
def default_ingest_options() -> IngestOptions:
    """1,000-sample shards, the bounds of docs/security.md, 16 image readers."""
    return IngestOptions()


@dataclass
class IngestConfig:
    """How to turn a LLaVA JSON/JSONL + image folder into shards.

    `source` is a file, folder or glob (path/URL) of one container: JSON array, JSONL, WebDataset shards
    or Parquet; records are LLaVA or `messages` (ShareGPT) dialect (core/io/sources.py); `format` forces
    either ("auto", "jsonl", "wds:messages", ...). `image_root` is the folder that the records' image
    names are relative to (unused for images carried inline by WDS/Parquet); `run_dir` receives
    `shards/` and `ledger/ingest/`.

    Bounds at the door (docs/security.md; each over-bound record is one quarantine row with the limit in
    its detail): `max_json_depth` (JSON nesting, checked on the bytes before a parser runs: too_deep),
    `max_int_digits` (integer literals: oversize_int), `max_record_bytes` (a record's bytes in the source
    and as written to its shard, text + metadata + meta: oversize_record; at most the shard reader's
    bound), `max_turns` (turns per conversation: too_many_turns), `max_image_bytes` (an image file, tar
    member or Parquet cell: oversize_image).
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
    max_json_depth: int = MAX_JSON_DEPTH
    max_int_digits: int = MAX_INT_DIGITS
    max_record_bytes: int = MAX_RECORD_BYTES
    max_turns: int = MAX_TURNS
    max_image_bytes: int = MAX_IMAGE_BYTES
    image_readers: int = 16  # threads reading image_root files ahead (core/io/pool.py); 1 = one after another

    def __post_init__(self) -> None:
        parse_format(self.format)  # ValueError on an unknown format, before any work
        check_ranges(self, {"max_json_depth": (2, None), "max_int_digits": (1, None),
                            "max_record_bytes": (1, MAX_JSON_BYTES), "max_turns": (2, None),
                            "max_image_bytes": (1, None), "image_readers": (1, None)})

    def limits(self) -> InputLimits:
        """The door's bounds as the readers take them."""
        return InputLimits(self.max_json_depth, self.max_int_digits, self.max_record_bytes, self.max_turns,
                           self.max_image_bytes)


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
    real path lies outside the real root; and names with NUL or control characters (`open` raises on NUL)
    -> SampleError(unsafe_path)."""
    bad = control_chars(name)
    if bad:
        raise SampleError("unsafe_path", f"image name {printable(name)!r} has the control character {bad}")
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


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _read_local_image(path: str, name: str, max_bytes: int) -> bytes:
    """A local image file's bytes: regular files only, at most `max_bytes`. Opened non-blocking and checked
    on the open descriptor (`fstat`), so a FIFO never blocks and no file swapped in after a check is read;
    a device cannot stream forever past the bound."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise SampleError("missing_image", f"{name}: {type(e).__name__}") from None
    except OSError as e:  # permission denied, too many symlink levels, ...
        raise SampleError("missing_image", f"{name}: {type(e).__name__}: {e.strerror}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):  # checked before fdopen, which refuses a directory with its own error
        os.close(fd)
        raise SampleError("missing_image", f"{name}: IsADirectoryError")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise SampleError("unsafe_path", f"image {name!r} is {kind}; only regular files are read")
        if st.st_size > max_bytes:
            raise SampleError("oversize_image", f"{name}: {st.st_size} bytes > max_image_bytes={max_bytes}")
        return _read_bounded(f, st.st_size, name, max_bytes)


def _read_bounded(f: Any, size: int | None, name: str, max_bytes: int) -> bytes:
    """At most `max_bytes` of `f` (else oversize_image), read as `size` (the size reported before, None when
    unknown) + 1 bytes, then on: a read asks for no more than the file holds (`read(n)` allocates n
    up front), and a file that grew after its size was taken is still bounded."""
    parts, n = [], 0
    want = min(size, max_bytes) + 1 if size is not None else 1 << 20
    while chunk := f.read(min(want, max_bytes + 1 - n)):
        parts.append(chunk)
        n += len(chunk)
        if n > max_bytes:
            raise SampleError("oversize_image", f"{name}: more than max_image_bytes={max_bytes} bytes")
        want = 1 << 20
    return b"".join(parts)


def _read_remote_image(fs: Any, path: str, name: str, max_bytes: int) -> bytes:
    """An fsspec image's bytes, at most `max_bytes`, in one ranged read (`bytes=0-max_bytes`): on an object store
    one GET, no HEAD first (the size is not needed: more than `max_bytes` back means oversize)."""
    import errno

    try:
        try:
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
        except OSError as e:  # a range on an empty object is refused (HTTP 416, InvalidRange -> EINVAL)
            if getattr(e, "errno", None) != errno.EINVAL:
                raise
            data = b""
        if len(data) > max_bytes:
            raise SampleError("oversize_image", f"{name}: more than max_image_bytes={max_bytes} bytes")
        if not data and fs.isdir(path):  # an object store's "folder" (a key prefix) reads as b"": no such image
            raise SampleError("missing_image", f"{name}: IsADirectoryError")
        return data
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise SampleError("missing_image", f"{name}: {type(e).__name__}") from None


def _read_image(fs: fsspec.AbstractFileSystem, root: str, local: bool, max_bytes: int, name: str) -> bytes:
    """The bytes of image `name` under `root` (runs in the read-ahead pool, core/io/pool.py): the path check
    (`_safe_image_path`), then the bounded reader (regular files only, at most `max_bytes`); SampleErrors are
    raised again in record order by `ahead.read`."""
    path = _safe_image_path(root, name, local)
    if local:
        return _read_local_image(fs._strip_protocol(path), name, max_bytes)
    return _read_remote_image(fs, path, name, max_bytes)


def _record_id(rec: Any, fallback: str) -> str:
    """The ledger key of a record before validation: its id when that is a usable string or integer, else
    `fallback` (an id with control characters or too many digits is quarantined as bad_id under it)."""
    sid = rec.get("id") if isinstance(rec, dict) else None
    if not isinstance(sid, (str, int)):
        return fallback
    try:
        text = str(sid)
    except ValueError:  # str() of an int over Python's 4,300 digits
        return fallback
    return fallback if control_chars(text) else text


def _parse_ahead(cfg: IngestConfig, src_name: str, r: Any) -> tuple[Sample | None, list[str]]:
    """A source record's Sample (parsed ahead of its turn) and the image names the pool can start reading."""
    if r.problem:
        return None, []
    s = Sample.from_record(r.record, source=src_name, max_text_chars=cfg.max_text_chars,
                           max_turns=cfg.max_turns)
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
    """Ingest `cfg.source` into `cfg.run_dir/shards` + `ledger/ingest/` as the run folder's one writer.

    Holds the writer lock of `ledger/ingest/` (`core.foundation.step.folder_lock`: a second ingest into the same run
    folder raises `FolderBusy` naming the holder, instead of both writing the same shards), and removes the
    previous ingest's shards and manifest first: an ingest is rewritten whole, so a re-run with fewer
    records leaves no old shard for a glob to find. See `_ingest` for the work itself."""
    with folder_lock(step_dir(cfg.ledger_dir or cfg.run_dir, STEP), f"ingest of {cfg.source}"):
        fs, shards = fsspec.core.url_to_fs(f"{cfg.run_dir.rstrip('/')}/shards")
        old = fs.glob(f"{shards}/*.tar") + fs.glob(f"{shards}/manifest.json")
        if old:
            log.info("ingest: removing the %d files of the previous ingest in %s/shards", len(old), cfg.run_dir)
            fs.rm(old)
        return _ingest(cfg, progress_every)


def _ingest(cfg: IngestConfig, progress_every: int = 5000) -> IngestResult:
    """Ingest `cfg.source` into `cfg.run_dir/shards` and write `ledger/ingest/part-ingest.parquet`.

    The source's records are first counted per file without the parser (`core.io.sources.count_records`);
    after the run, ledger rows must equal that count per file (`source_accounting.json` next to the
    ledger), else SourceAccountingError: a record is never lost silently.
    """
    t0 = time.time()
    src_name = cfg.source_name or PurePosixPath(cfg.source.rstrip("/")).stem
    fs_img, _ = fsspec.core.url_to_fs(cfg.image_root or ".")
    local_img = isinstance(fs_img, fsspec.implementations.local.LocalFileSystem)
    limits = cfg.limits()
    flagged: dict[str, dict[int, str]] = {}  # JSON-array items the count pass found over a bound
    counted = count_records(cfg.source, cfg.format, limits, flagged)  # validates the containers before any work
    log.info("ingest: %d records counted in %d file(s) of %s", sum(counted.values()), len(counted), cfg.source)
    rows: dict[str, int] = {f: 0 for f in counted}
    n = 0
    led_dir = step_dir(cfg.ledger_dir or cfg.run_dir, STEP)
    writer = ShardWriter(f"{cfg.run_dir.rstrip('/')}/shards", cfg.prefix, cfg.shard_max_samples, cfg.shard_max_bytes)
    # an object store's reads run as coroutines on its client's loop (core/io/remote.py); local reads in threads
    aread = None if local_img else async_image_reader(fs_img, partial(_safe_image_path, cfg.image_root),
                                                      cfg.max_image_bytes)
    records = read_ahead(iter_source(cfg.source, cfg.format, cfg.caption_prompt, limits, flagged),
                         partial(_parse_ahead, cfg, src_name),
                         partial(_read_image, fs_img, cfg.image_root, local_img, cfg.max_image_bytes), cfg.image_readers,
                         aread=aread)
    with LedgerWriter(led_dir / "part-ingest.parquet", STEP) as led, closing(records):
        for ahead in records:
            r = ahead.item
            n += 1
            rows[r.file] = rows.get(r.file, 0) + 1
            idx = r.index
            stem = PurePosixPath(r.file).stem if len(counted) > 1 else src_name
            fallback = r.fallback_id or f"{stem}#{idx}"
            rec = r.record
            rid = _record_id(rec, fallback)
            try:
                if r.problem:
                    raise SampleError(*r.problem)
                s = ahead.prepared()  # Sample.from_record(rec, ...), run ahead of time
                rid = s.id
                if rid in led.decided:
                    raise SampleError("duplicate_id", f"id {rid!r} seen earlier (the first one in file order is kept)")
                n_bytes = len(s.to_json_bytes())  # what the shard's key.json will hold: text + metadata + meta
                if n_bytes > cfg.max_record_bytes:
                    raise SampleError("oversize_record", f"{n_bytes} bytes as written > max_record_bytes="
                                                         f"{cfg.max_record_bytes}")
                if r.image_bytes is not None:
                    data = list(r.image_bytes)
                    for i, b in enumerate(data):
                        if len(b) > cfg.max_image_bytes:
                            raise SampleError("oversize_image", f"image #{i}: {len(b)} bytes > max_image_bytes="
                                                                f"{cfg.max_image_bytes}")
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
    write_json_atomic(accounting, led_dir / ACCOUNTING_FILE, indent=1)
    manifest = {
        "source": cfg.source,
        "summary": res.summary(),
        "shards": [{"path": s.path, "n_samples": s.n_samples, "n_bytes": s.n_bytes, "sha256": s.sha256} for s in shards],
    }
    write_json_atomic(manifest, f"{cfg.run_dir.rstrip('/')}/shards/manifest.json", indent=1)
    if not accounting["balanced"]:
        bad = [p for p in per_file if p["source_records"] != p["ledger_rows"]]
        raise SourceAccountingError(f"ingest wrote {n} ledger rows for {res.source_records} source records: {bad}")
    log.info("ingest done: %s", res.summary())
    return res
