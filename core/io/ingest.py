"""Ingest: LLaVA-style JSON array or JSONL + an image folder -> WebDataset shards + the ingest ledger.

Streaming: a JSON array is parsed item by item with ijson, JSONL line by line, so a 20 GB file is
never loaded whole. Shard assignment is sequential in input order (deterministic). Every input
record gets exactly one ledger row: keep (with its shard) or quarantine (with a reason).

With `partition_records > 0` the source is cut into partitions (core/io/partition.py) ingested as units of
the shard fan-out (`IngestStep`), each into its own shards and ledger part; a reduce resolves the ids
decided in several partitions as the one pass does (docs/ingest.md, "Partitioned ingest").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
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
from core.foundation.outputs import folder_lock, write_json_atomic, write_parquet_atomic
from core.foundation.sample import MAX_TEXT_CHARS, MAX_TURNS, Sample, SampleError
from core.foundation.step import EMPTY_PART, SCHEDULING_FIELDS, ShardStep, Unit
from core.io.images import DEFAULT_MAX_PIXELS, decode_image
from core.io.partition import Partition, iter_partition, merge_runs, plan_partitions, read_run, write_run
from core.io.pool import read_ahead
from core.io.remote import async_image_reader
from core.io.sources import DEFAULT_CAPTION_PROMPT, count_records, iter_source, parse_format
from core.io.wds import ShardInfo, ShardWriter, shard_name
from core.io.wds.reader import MAX_JSON_BYTES
from core.runs.fanout import FanOut, StepSpec, run_fanout, tiny_fanout

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
    :param partition_records: 0: one pass over the source (one process). N > 0: the source is cut into
        partitions of about N records (files, JSON item ranges, JSONL byte ranges, Parquet row groups, WDS
        tars) ingested as fan-out units, each into its own shards and ledger part (docs/ingest.md).
    :param fanout: How the partitions spread over workers (core/runs/fanout.py; 1 worker: in this process).
    """

    shard_max_samples: int = 1000
    shard_max_bytes: int = 256 << 20
    max_text_chars: int = MAX_TEXT_CHARS
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = MAX_IMAGE_BYTES
    image_readers: int = 16
    partition_records: int = 0
    fanout: FanOut = field(default_factory=tiny_fanout)

    def __post_init__(self) -> None:
        check_ranges(self, {"shard_max_samples": (1, None), "shard_max_bytes": (1, None), "max_text_chars": (1, None),
                            "max_image_pixels": (1, None), "max_image_bytes": (1, None), "image_readers": (1, None),
                            "partition_records": (0, None)})

    def ingest_config(self, source: str, image_root: str, run_dir: str, format: str = "auto") -> IngestConfig:
        """The full `IngestConfig` of one call."""
        return IngestConfig(source=source, image_root=image_root, run_dir=run_dir, format=format,
                            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


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
    partition_records: int = 0  # 0: one pass; N: partitions of ~N records as fan-out units (`ingest`)
    fanout: FanOut = field(default_factory=tiny_fanout)  # workers over the partitions (scheduling only)

    def __post_init__(self) -> None:
        parse_format(self.format)  # ValueError on an unknown format, before any work
        check_ranges(self, {"max_json_depth": (2, None), "max_int_digits": (1, None),
                            "max_record_bytes": (1, MAX_JSON_BYTES), "max_turns": (2, None),
                            "max_image_bytes": (1, None), "image_readers": (1, None),
                            "partition_records": (0, None)})

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


def _image_fs(cfg: IngestConfig) -> Any:
    """The filesystem of the image root. On S3 its connection pool holds as many connections as there are image
    readers (aiobotocore's default of 10 would cap the reads in flight at 10, whatever `image_readers` says)."""
    root = cfg.image_root or "."
    kw = {}
    if fsspec.core.split_protocol(root)[0] in ("s3", "s3a"):
        kw = {"config_kwargs": {"max_pool_connections": max(10, cfg.image_readers)}}
    return fsspec.core.url_to_fs(root, **kw)[0]


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


KEEP, POST, PRE = 0, 1, 2  # where a record's decision was made: kept; after the duplicate check; before it


def duplicate_ledger_id(rid: str, idx: int, stem: str, multi: bool) -> str:
    """The ledger id of a later record whose id `rid` was decided before (the row stays keyed uniquely; its
    reason says why): `<id>#dup<index>`, or `<id>#dup@<file stem>:<index>` in a source of several files."""
    return f"{rid}#dup@{stem}:{idx}" if multi else f"{rid}#dup{idx}"


def duplicate_detail(rid: str) -> str:
    return f"id {rid!r} seen earlier (the first one in file order is kept)"


def _decide_records(cfg: IngestConfig, records: Any, writer: ShardWriter, led: LedgerWriter, multi: bool,
                    src_name: str, rows: dict[str, int], t0: float, progress_every: int,
                    note: Callable[[str, int, Any], None] | None = None) -> int:
    """Decide every record of `records` (read-ahead `SourceRecord`s) into `led`: keep (written by `writer`) or
    quarantine with a reason; ids already decided in `led` are duplicates (the first one is kept). `rows`
    counts ledger rows per source file; `note(ledger_id, stage, record)` (partitioned ingest) hears where each
    decision was made (KEEP, POST: after the duplicate check, PRE: before it). Returns the records seen."""
    n = 0
    for ahead in records:
        r = ahead.item
        n += 1
        rows[r.file] = rows.get(r.file, 0) + 1
        idx = r.index
        stem = PurePosixPath(r.file).stem if multi else src_name
        fallback = r.fallback_id or f"{stem}#{idx}"
        rec = r.record
        rid = _record_id(rec, fallback)
        stage = PRE
        try:
            if r.problem:
                raise SampleError(*r.problem)
            s = ahead.prepared()  # Sample.from_record(rec, ...), run ahead of time
            rid = s.id
            if rid in led.decided:
                raise SampleError("duplicate_id", duplicate_detail(rid))
            stage = POST
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
            stage = KEEP
        except SampleError as e:
            if rid in led.decided:
                stage = PRE  # the reason stands; only the ledger id changes
                rid = duplicate_ledger_id(rid, idx, stem, multi)  # keep the ledger keyed uniquely; the reason says why
            log.warning("quarantine %s: %s", rid, e)
            led.add(rid, "quarantine", e.reason, detail=e.detail[:500], **r.position)
        if note is not None:
            note(rid, stage, r)
        if progress_every and n % progress_every == 0:
            log.info("ingest: %d records, %d kept, %.0f rec/s", n, led.counts["keep"], n / (time.time() - t0))
    return n


def ingest(cfg: IngestConfig, progress_every: int = 5000) -> IngestResult:
    """Ingest `cfg.source` into `cfg.run_dir/shards` + `ledger/ingest/` as the run folder's one writer.

    `cfg.partition_records > 0`: partitioned ingest (`_ingest_partitioned`: a fan-out of `IngestStep` units
    over `cfg.fanout` workers, then the reduce); else one pass (below).

    Holds the writer lock of `ledger/ingest/` (`core.foundation.step.folder_lock`: a second ingest into the same run
    folder raises `FolderBusy` naming the holder, instead of both writing the same shards), and removes the
    previous ingest's shards and manifest first: an ingest is rewritten whole, so a re-run with fewer
    records leaves no old shard for a glob to find. See `_ingest` for the work itself."""
    if cfg.partition_records > 0:
        return _ingest_partitioned(cfg, progress_every)
    led_dir = step_dir(cfg.ledger_dir or cfg.run_dir, STEP)
    with folder_lock(led_dir, f"ingest of {cfg.source}"):
        fs, shards = fsspec.core.url_to_fs(f"{cfg.run_dir.rstrip('/')}/shards")
        old = fs.glob(f"{shards}/*.tar") + fs.glob(f"{shards}/manifest.json")
        if old:
            log.info("ingest: removing the %d files of the previous ingest in %s/shards", len(old), cfg.run_dir)
            fs.rm(old)
        _remove_partitioned_outputs(led_dir)
        return _ingest(cfg, progress_every)


def _ingest(cfg: IngestConfig, progress_every: int = 5000) -> IngestResult:
    """Ingest `cfg.source` into `cfg.run_dir/shards` and write `ledger/ingest/part-ingest.parquet`.

    The source's records are first counted per file without the parser (`core.io.sources.count_records`);
    after the run, ledger rows must equal that count per file (`source_accounting.json` next to the
    ledger), else SourceAccountingError: a record is never lost silently.
    """
    t0 = time.time()
    src_name = cfg.source_name or PurePosixPath(cfg.source.rstrip("/")).stem
    fs_img = _image_fs(cfg)
    local_img = isinstance(fs_img, fsspec.implementations.local.LocalFileSystem)
    limits = cfg.limits()
    flagged: dict[str, dict[int, str]] = {}  # JSON-array items the count pass found over a bound
    counted = count_records(cfg.source, cfg.format, limits, flagged)  # validates the containers before any work
    log.info("ingest: %d records counted in %d file(s) of %s", sum(counted.values()), len(counted), cfg.source)
    rows: dict[str, int] = {f: 0 for f in counted}
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
        n = _decide_records(cfg, records, writer, led, len(counted) > 1, src_name, rows, t0, progress_every)
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


# ---------------------------------------------------------------------------------------------------------
# partitioned ingest: one fan-out unit per source partition (core/io/partition.py), then a reduce
# ---------------------------------------------------------------------------------------------------------
MAX_DUPLICATE_ROUNDS = 8  # reduce rounds: a rewritten id can equal a later record's id (then that one is a duplicate)
PARTS_DIR = "_partitions"  # in ledger/ingest/: per-partition side files (no .parquet suffix: ledger readers skip them)


def _remove_partitioned_outputs(led_dir: Path) -> None:
    """A one-pass ingest over a folder a partitioned ingest wrote: its ledger parts and side files go."""
    for f in list(led_dir.glob("part-p[0-9]*.parquet")) + list(led_dir.glob(f"{EMPTY_PART}.parquet")):
        f.unlink()
    shutil.rmtree(led_dir / PARTS_DIR, ignore_errors=True)


def _ingest_partitioned(cfg: IngestConfig, progress_every: int = 5000) -> IngestResult:
    """Partitioned ingest: plan the source's partitions (`plan_partitions`: the count pass, before any work),
    run `IngestStep` over them with `cfg.fanout` (`run_fanout`: in this process with 1 worker, a Ray actor
    pool with more), whose reduce resolves ids decided in several partitions and writes the accounting and
    the manifest. A re-run after a failure redoes only the unfinished partitions (`FanOutIncomplete` names
    them)."""
    t0 = time.time()
    parts = plan_partitions(cfg.source, cfg.format, cfg.limits(), cfg.partition_records)
    log.info("ingest: %d records in %d partition(s) of %s", sum(p.n for p in parts), len(parts), cfg.source)
    spec = StepSpec(IngestStep, (cfg,), {"progress_every": progress_every})
    summary = run_fanout(spec, [p.unit for p in parts], cfg.fanout)
    res = read_ingest_result(cfg.run_dir)
    res.seconds = time.time() - t0
    log.info("ingest done (%d partitions, %d redone, %d resumed): %s", len(parts), len(summary.done),
             len(summary.skipped), res.summary())
    return res


def read_ingest_result(run_dir: str) -> IngestResult:
    """The `IngestResult` that `shards/manifest.json` records."""
    with fsspec.open(f"{run_dir.rstrip('/')}/shards/manifest.json", "r") as f:
        m = json.load(f)
    sm = m["summary"]
    shards = [ShardInfo(s["path"], s["n_samples"], s["n_bytes"], s["sha256"]) for s in m["shards"]]
    return IngestResult(shards, sm["records"], sm["kept"], sm["quarantined"], dict(sm["reasons"]), sm["seconds"],
                        source_records=sm["source_records"])


class IngestStep(ShardStep):
    """Ingest of one source partition per unit (the unit string is a `Partition`, core/io/partition.py).

    `process` decides the partition's records exactly as the one-pass ingest does (`_decide_records`), into
    its own shards `<prefix>-p00003-000000.tar` (no two units share a file), its ledger part
    `part-p00003.parquet` (published last: the unit's completion record) and, in `ledger/ingest/_partitions/`,
    its ledger ids sorted (`p00003.ids`, with where each decision was made) and its accounting and shard list
    (`p00003.json`). `finish` (the reduce, once, on the driver) k-way merges the sorted ids
    (`core.io.partition.merge_runs`, bounded memory): an id decided in several partitions stays with the
    first partition in source order; in each later one the row is rewritten as the one-pass ingest would
    have written it (a kept or later-rejected record: quarantine `duplicate_id`, its sample removed from its
    shard; a record rejected before the duplicate check: its own reason), under the one-pass ingest's
    uniquified ledger id. Then the merged `source_accounting.json` and `shards/manifest.json`. The reduce is
    idempotent (a re-run after it was killed finishes it)."""

    name = STEP
    stamp_attrs = ("cfg",)
    stamp_ignore = SCHEDULING_FIELDS | {"image_readers", "ledger_dir", "run_dir"}  # where, how fast: not what

    def __init__(self, cfg: IngestConfig, progress_every: int = 5000):
        super().__init__(cfg.ledger_dir or cfg.run_dir)
        self.cfg = cfg
        self.src_name = cfg.source_name or PurePosixPath(cfg.source.rstrip("/")).stem
        self.progress_every = progress_every
        self.on_mismatch = "recompute"  # as the one-pass ingest: another config or code rewrites it whole
        self._parts: list[Partition] = []
        self._t0 = time.time()

    @property
    def shards_url(self) -> str:
        return f"{self.cfg.run_dir.rstrip('/')}/shards"

    @property
    def parts_dir(self) -> Path:
        return self.ledger_dir / PARTS_DIR

    def unit_name(self, url: str) -> str:
        return Partition.from_unit(url).name

    def units(self, urls: Sequence[str]) -> list[Unit]:
        units = super().units(urls)
        self._parts = [Partition.from_unit(u.url) for u in units]  # the reduce's partitions, in source order
        return units

    def check_stamp(self) -> str:
        first = not self._stamp_state
        state = super().check_stamp()
        if first and not any(self.ledger_dir.glob("part-p[0-9]*.parquet")):
            self.clear_outputs()  # nothing to resume: a fresh ingest (the previous one's shards go, as one-pass)
        return state

    def clear_outputs(self) -> None:
        """The ledger parts, the side files, the accounting, and every shard and the manifest of `shards/`."""
        super().clear_outputs()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        (self.ledger_dir / ACCOUNTING_FILE).unlink(missing_ok=True)
        fs, root = fsspec.core.url_to_fs(self.shards_url)
        old = fs.glob(f"{root}/*.tar") + fs.glob(f"{root}/manifest.json")
        if old:
            log.info("ingest: removing the %d files of the previous ingest in %s", len(old), self.shards_url)
            fs.rm(old)

    # -- one partition ------------------------------------------------------------------------------------
    def process(self, unit: Unit, led: LedgerWriter) -> dict[str, int]:
        cfg, p = self.cfg, Partition.from_unit(unit.url)
        prefix = f"{cfg.prefix}-{p.name}"
        fs, root = fsspec.core.url_to_fs(self.shards_url)
        stale = fs.glob(f"{root}/{prefix}-*.tar")  # a killed attempt's shards of this partition
        if stale:
            fs.rm(stale)
        fs_img = _image_fs(cfg)
        local_img = isinstance(fs_img, fsspec.implementations.local.LocalFileSystem)
        run: list[tuple[str, int, int, int, int]] = []

        def note(rid: str, stage: int, r: Any) -> None:
            run.append((rid, p.order, stage, r.index, -1 if r.offset is None else r.offset))

        writer = ShardWriter(self.shards_url, prefix, cfg.shard_max_samples, cfg.shard_max_bytes)
        aread = None if local_img else async_image_reader(fs_img, partial(_safe_image_path, cfg.image_root),
                                                          cfg.max_image_bytes)  # as the one pass reads
        records = read_ahead(iter_partition(p, cfg.caption_prompt, cfg.limits()),
                             partial(_parse_ahead, cfg, self.src_name),
                             partial(_read_image, fs_img, cfg.image_root, local_img, cfg.max_image_bytes),
                             cfg.image_readers, aread=aread)
        rows: dict[str, int] = {}
        with closing(records):
            n = _decide_records(cfg, records, writer, led, p.multi, self.src_name, rows, time.time(),
                                self.progress_every, note)
        shards = writer.close()
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        run.sort()
        write_run(self.parts_dir / f"{p.name}.ids", run)
        write_json_atomic({"partition": p.unit, "source_records": p.n, "ledger_rows": n,
                           "shards": [{"path": s.path, "n_samples": s.n_samples, "n_bytes": s.n_bytes,
                                       "sha256": s.sha256} for s in shards]},
                          self.parts_dir / f"{p.name}.json", indent=1)
        return {"records": n, "shards": len(shards)}

    # -- the reduce ---------------------------------------------------------------------------------------
    def finish(self, n_units: int) -> int:
        super().finish(n_units)  # an empty part when the source has no file
        for _ in range(MAX_DUPLICATE_ROUNDS):
            with_dups = self._find_duplicates()
            if not with_dups:
                break
            for p in self._parts:
                if p.order in with_dups:
                    self._rewrite_duplicates(p)
        else:  # ids built to collide with rewritten ids round after round (the one pass fails on them too)
            raise SourceAccountingError(f"ingest: ledger ids still decided twice after {MAX_DUPLICATE_ROUNDS} "
                                        f"rounds of duplicate rewriting in {self.ledger_dir}")
        self._write_accounting()
        return 0

    def _dups_file(self, order: int) -> Path:
        return self.parts_dir / f"p{order:05d}.dups.jsonl"

    def _find_duplicates(self) -> set[int]:
        """Merge every partition's sorted ledger ids; each id decided again in a later partition is written to
        that partition's `.dups.jsonl` (buffered: at most `RUN_BATCH` rows held). Returns those partitions."""
        import core.io.partition as part_mod

        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for f in self.parts_dir.glob("*.dups.jsonl"):
            f.unlink()
        buf: dict[int, list[list[Any]]] = {}
        held, found = 0, set()

        def flush() -> None:
            for order, items in buf.items():
                with open(self._dups_file(order), "a") as f:
                    f.writelines(json.dumps(x) + "\n" for x in items)
            buf.clear()

        prev = None
        runs = [self.parts_dir / f"{p.name}.ids" for p in self._parts]
        for sid, order, stage, index, offset in merge_runs(runs, self.parts_dir):
            if sid == prev:  # decided in an earlier partition (the runs are merged by id, then order)
                buf.setdefault(order, []).append([sid, stage, index, offset])
                found.add(order)
                held += 1
                if held >= part_mod.RUN_BATCH:
                    flush()
                    held = 0
            prev = sid
        flush()
        if found:
            log.info("ingest: ids decided again in %d later partition(s): rewriting them as duplicate_id", len(found))
        return found

    def _rewrite_duplicates(self, p: Partition) -> None:
        """Apply the partition's `.dups.jsonl` (at most one row per record of the partition): first remove the
        kept duplicates from their shards, then rewrite its ledger part, then its id run. Idempotent: a part
        already rewritten holds none of the ids any more."""
        import pyarrow.parquet as pq

        from core.foundation.ledger import SCHEMA

        dups: dict[str, tuple[int, int, int]] = {}
        with open(self._dups_file(p.order)) as f:
            for line in f:
                sid, stage, index, offset = json.loads(line)
                dups[sid] = (stage, index, offset)
        part = self.part(p.name)
        cols = pq.read_table(part, schema=SCHEMA).to_pydict()
        hit = [i for i, sid in enumerate(cols["sample_id"]) if sid in dups]
        stem = PurePosixPath(p.file).stem if p.multi else self.src_name
        if hit:
            self._rewrite_part(p, part, cols, hit, dups, stem)
        # last, the run: the partition's ids as its part now holds them (a rewritten row's reason stands from
        # now on: PRE), so the next round sees an id that a rewrite made equal to a later record's id
        run = [(duplicate_ledger_id(sid, index, stem, p.multi), order, PRE, index, offset)
               if sid in dups else (sid, order, stage, index, offset)
               for sid, order, stage, index, offset in read_run(self.parts_dir / f"{p.name}.ids")]
        run.sort()
        write_run(self.parts_dir / f"{p.name}.ids", run)

    def _rewrite_part(self, p: Partition, part: Any, cols: dict[str, list], hit: list[int],
                      dups: dict[str, tuple[int, int, int]], stem: str) -> None:
        import pyarrow as pa

        from core.foundation.ledger import SCHEMA
        from core.foundation.sample import sample_key

        drop: dict[str, set[str]] = {}
        for i in hit:
            if cols["decision"][i] == "keep":
                drop.setdefault(cols["shard"][i], set()).add(sample_key(cols["sample_id"][i]))
        info_path = self.parts_dir / f"{p.name}.json"
        info = json.loads(info_path.read_text())
        for sh in info["shards"]:
            keys = drop.get(shard_name(sh["path"]))
            if keys:
                sh.update(_drop_from_shard(sh["path"], keys))
        write_json_atomic(info, info_path, indent=1)
        for i in hit:
            sid = cols["sample_id"][i]
            stage, index, offset = dups[sid]
            cols["sample_id"][i] = duplicate_ledger_id(sid, index, stem, p.multi)
            if stage != PRE:  # the one-pass ingest raised duplicate_id before anything after its check
                pos: dict[str, Any] = {"file": p.file.rsplit("/", 1)[-1], "record_index": index}
                if offset >= 0:
                    pos["byte_offset"] = offset
                cols["decision"][i], cols["reason"][i], cols["score"][i], cols["shard"][i] = \
                    "quarantine", "duplicate_id", None, ""
                cols["extra"][i] = json.dumps({"detail": duplicate_detail(sid)[:500], **pos}, sort_keys=True)
        write_parquet_atomic(pa.Table.from_pydict(cols, schema=SCHEMA), part)
        log.info("ingest: %s: %d ids decided in an earlier partition rewritten", p.name, len(hit))

    def _write_accounting(self) -> None:
        """The merged `source_accounting.json` (per file and per partition) and `shards/manifest.json`;
        SourceAccountingError when ledger rows differ from the counted records anywhere."""
        import pyarrow.parquet as pq

        counts = {"keep": 0, "quarantine": 0}
        reasons: dict[str, int] = {}
        files: dict[str, dict[str, Any]] = {}
        per_part, shards = [], []
        n_rows = 0
        for p in self._parts:
            t = pq.read_table(self.part(p.name), columns=["decision", "reason"]).to_pydict()
            for d, r in zip(t["decision"], t["reason"]):
                counts[d] = counts.get(d, 0) + 1
                if r:
                    reasons[r] = reasons.get(r, 0) + 1
            rows = len(t["decision"])
            n_rows += rows
            info = json.loads((self.parts_dir / f"{p.name}.json").read_text())
            shards.extend(info["shards"])
            f = files.setdefault(p.file, {"file": p.file, "source_records": 0, "ledger_rows": 0})
            f["source_records"] += p.n
            f["ledger_rows"] += rows
            per_part.append({"partition": p.name, "file": p.file, "first_record": p.first, "source_records": p.n,
                             "ledger_rows": rows})
        n_src = sum(p.n for p in self._parts)
        res = IngestResult([], n_rows, counts["keep"], counts["quarantine"], reasons, time.time() - self._t0,
                           source_records=n_src)
        balanced = all(x["source_records"] == x["ledger_rows"] for x in per_part) and \
            n_rows == res.n_kept + res.n_quarantined
        accounting = {
            "source": self.cfg.source, "format": self.cfg.format, "files": list(files.values()),
            "source_records": n_src, "ledger_rows": n_rows, "kept": res.n_kept, "quarantined": res.n_quarantined,
            "balanced": balanced, "partition_records": self.cfg.partition_records, "partitions": per_part,
        }
        write_json_atomic(accounting, self.ledger_dir / ACCOUNTING_FILE, indent=1)
        summary = res.summary()
        summary["shards"] = len(shards)
        write_json_atomic({"source": self.cfg.source, "summary": summary, "shards": shards},
                          f"{self.shards_url}/manifest.json", indent=1)
        if not balanced:
            bad = [x for x in per_part if x["source_records"] != x["ledger_rows"]]
            raise SourceAccountingError(f"ingest wrote {n_rows} ledger rows for {n_src} source records: {bad[:20]}")


def _drop_from_shard(url: str, keys: set[str]) -> dict[str, Any]:
    """Rewrite shard `url` without the samples whose key is in `keys` (their members), byte for byte as
    `ShardWriter` writes the others (core/io/wds/members.py); atomically. Returns its new
    {n_samples, n_bytes, sha256}."""
    import hashlib
    import io
    import tarfile

    from core.foundation.outputs import temp_path
    from core.io.wds.members import _end_of_archive, _member_bytes

    fs, path = fsspec.core.url_to_fs(url)
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    tmp = temp_path(path) if local else ""
    out = open(tmp, "wb") if local else io.BytesIO()
    h, n_bytes, kept = hashlib.sha256(), 0, set()
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                key = m.name.split(".", 1)[0]
                data = tar.extractfile(m).read()
                if key in keys:
                    continue
                kept.add(key)
                for piece in _member_bytes(m.name, data):
                    h.update(piece)
                    out.write(piece)
                    n_bytes += len(piece)
        end = _end_of_archive(n_bytes)
        h.update(end)
        out.write(end)
        n_bytes += len(end)
        if local:
            out.close()
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, out.getvalue())
    finally:
        if local and not out.closed:
            out.close()
            Path(tmp).unlink(missing_ok=True)
    return {"n_samples": len(kept), "n_bytes": n_bytes, "sha256": h.hexdigest()}
