"""Lossless WebDataset shard I/O.

Writer: `ShardWriter` / `write_shards` write `key.json` (LLaVA record) plus `key.<ext>` (one image) or
`key.<i>.<ext>` (several), image bytes untouched, with fixed tar metadata so equal inputs give
byte-identical shards. Reader: `iter_shard` / `iter_samples` stream a shard from a local path or any
fsspec URL (s3://...) and turn every bad record into a ledger quarantine row with a reason; nothing
crashes the job and nothing vanishes.

Speed (benchmarks/export_throughput.py): headers are written from a tarfile-built template (only name,
size and checksum change) and the writer hands ~1 MB batches to one thread that hashes and writes them
while the caller reads on. A local shard that is exactly what ShardWriter writes (every header equal to
the writer's bytes, clean end) is indexed without tarfile and its images are read with `os.pread` only
for the samples that are wanted; any other local tar is parsed by tarfile with seeks, and fsspec URLs
are read in tarfile's stream mode in one forward pass. All paths yield the same samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.images import DEFAULT_MAX_PIXELS, IMAGE_EXTS, decode_image, image_ext
from core.ledger import LedgerWriter
from core.sample import MAX_TEXT_CHARS, Sample, SampleError

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 8 << 20  # a key.json larger than this is quarantined as oversize_text unparsed
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SUFFIX_RE = re.compile(r"^(?:json|(?:(\d{1,4})\.)?([a-z]{3,4}))$")


@dataclass
class ShardInfo:
    """What one written shard holds."""

    path: str
    n_samples: int
    n_bytes: int
    sha256: str
    ids: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return shard_name(self.path)


def shard_name(url: str) -> str:
    """`s3://b/x/shard-000001.tar` -> `shard-000001` (used for ledger parts and per-shard outputs)."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".tar") else base


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


_TEMPLATE = _tarinfo("", 0)  # fixed metadata: mtime 0, uid/gid 0, mode 0644, empty uname/gname
_TEMPLATE_INFO = _TEMPLATE.get_info()

# The USTAR header tarfile builds from the template differs between members only in the name (bytes
# 0:100), the size (124:136) and the checksum (148:155) over the other bytes. The constant parts are cut
# from a header tarfile built itself, so `_member_header` returns tarfile's bytes without running
# `_create_header` (~60 us) per member; tests/test_wds_io.py compares the two over many names and sizes.
_USTAR = _TEMPLATE.create_ustar_header(dict(_TEMPLATE_INFO), tarfile.ENCODING, "surrogateescape")
_USTAR_IDS = _USTAR[100:124]  # mode, uid, gid
_USTAR_MTIME = _USTAR[136:148]
_USTAR_TAIL = _USTAR[155:]  # the blank closing the checksum field, type, linkname, magic, uname, gname, ...
# tarfile.calc_chksums: 256 (the checksum field counted as 8 blanks) + every other byte
_USTAR_SUM = 256 + sum(_USTAR_IDS) + sum(_USTAR_MTIME) + sum(_USTAR[156:])
_MAX_USTAR_SIZE = 8**11 - 1  # 11 octal digits; tarfile raises for more in USTAR (shards are far smaller)


def _member_header(name: str, size: int) -> bytes:
    """The header block(s) `TarFile.addfile(_tarinfo(name, size))` writes in USTAR format: one block
    for names up to USTAR's 100 bytes, tarfile's PAX sequence for longer ones (keys of long ids)."""
    raw = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(raw) <= tarfile.LENGTH_NAME and 0 <= size <= _MAX_USTAR_SIZE:
        size_field = b"%011o\0" % size
        chksum = _USTAR_SUM + sum(raw) + sum(size_field)
        return raw.ljust(tarfile.LENGTH_NAME, tarfile.NUL) + _USTAR_IDS + size_field + _USTAR_MTIME + \
            b"%06o\0" % chksum + _USTAR_TAIL
    info = dict(_TEMPLATE_INFO)
    info["name"], info["size"] = name, size
    if len(raw) <= tarfile.LENGTH_NAME:  # only an oversize size gets here: tarfile raises as before
        return _TEMPLATE.create_ustar_header(info, tarfile.ENCODING, "surrogateescape")
    # USTAR cannot hold a long slash-free name (keys of long ids): a PAX record carries it
    return _TEMPLATE.create_pax_header(info, tarfile.ENCODING)


def _member_bytes(name: str, data: bytes) -> list[bytes]:
    """One regular-file member exactly as `TarFile.addfile(_tarinfo(name, len(data)), ...)` writes it in
    USTAR format: the header (`_member_header`), the data, and NUL padding to the next 512-byte block."""
    out = [_member_header(name, len(data)), data]
    rem = len(data) % tarfile.BLOCKSIZE
    if rem:
        out.append(tarfile.NUL * (tarfile.BLOCKSIZE - rem))
    return out


def _end_of_archive(offset: int) -> bytes:
    """What `TarFile.close` appends: two zero blocks, then zeros up to a whole 10240-byte record."""
    offset += 2 * tarfile.BLOCKSIZE
    return tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-offset) % tarfile.RECORDSIZE)


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The (member name, bytes) pairs of one sample in write order: json first, then images."""
    if len(sample.image_bytes) != len(sample.images):
        raise ValueError(f"sample {sample.id}: {len(sample.images)} images named, {len(sample.image_bytes)} loaded")
    out = [(f"{sample.key}.json", sample.to_json_bytes())]
    out += list(zip(image_member_names(sample), sample.image_bytes))
    return out


def image_member_names(sample: Sample) -> list[str]:
    """Tar member names of the sample's images: `key.<ext>` for one image, `key.<i>.<ext>` for several,
    the extension from the encoded bytes (jpg, png, webp, ...)."""
    key, multi = sample.key, len(sample.image_bytes) > 1
    exts = [image_ext(data, name) for data, name in zip(sample.image_bytes, sample.images)]
    return [f"{key}.{i}.{ext}" if multi else f"{key}.{ext}" for i, ext in enumerate(exts)]


class ShardWriter:
    """Streaming writer that rolls over to a new shard by sample count or bytes.

    Shards are named `<prefix>-000000.tar`, ... in write order. Local shards are written in place to
    a temp name (hashed while written) and renamed when complete, so a crash never leaves a half shard
    under a final name; remote shards are assembled in memory and uploaded when complete.

    The member bytes are handed, in order and in batches of about `_BATCH` bytes, to one helper thread
    that hashes and writes them: sha256 and the file writes release the GIL, so they overlap with the
    caller reading and validating the next samples. At most `_IN_FLIGHT` batches wait (bounded memory);
    an error in the thread (disk full, ...) is raised by the next `write` or by `close`.
    """

    _BATCH = 1 << 20
    _IN_FLIGHT = 4

    def __init__(self, out_dir: str, prefix: str = "shard", max_samples: int = 1000, max_bytes: int = 256 << 20,
                 start_index: int = 0):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.out_dir = str(out_dir).rstrip("/")
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.index = start_index
        self.fs, self.root = fsspec.core.url_to_fs(self.out_dir)
        self.fs.makedirs(self.root, exist_ok=True)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.shards: list[ShardInfo] = []
        self._f = None  # local: the open temp file; remote: a BytesIO uploaded when the shard is complete
        self._tmp = ""
        self._hash = hashlib.sha256()
        self._offset = 0  # bytes written to the current shard
        self._cur: ShardInfo | None = None
        self._pending: list[bytes] = []  # member parts not yet handed to the writer thread
        self._pending_n = 0
        self._pool: ThreadPoolExecutor | None = None
        self._futures: deque[Future] = deque()

    def _open(self) -> None:
        name = f"{self.prefix}-{self.index:06d}.tar"
        self.index += 1
        self._cur = ShardInfo(f"{self.out_dir}/{name}", 0, 0, "")
        self._hash = hashlib.sha256()
        self._offset = 0
        if self.local:
            # written in place under a temp name (no in-memory copy of the shard), renamed when complete
            self._tmp = f"{self.root}/{name}.tmp"
            self._f = open(self._tmp, "wb")
        else:
            self._f = io.BytesIO()

    def _put(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_n += len(data)
        self._offset += len(data)

    def _submit(self) -> None:
        """Hand the pending parts to the writer thread (waiting while `_IN_FLIGHT` batches are queued)."""
        if not self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        while len(self._futures) >= self._IN_FLIGHT:
            self._futures.popleft().result()  # re-raises the thread's error here
        self._futures.append(self._pool.submit(_hash_and_write, self._hash, self._f, self._pending))
        self._pending, self._pending_n = [], 0

    def _drain(self) -> None:
        self._submit()
        while self._futures:
            self._futures.popleft().result()

    def write(self, sample: Sample) -> str:
        """Append one sample (with image_bytes loaded); returns the shard name it went to."""
        members = sample_members(sample)
        size = sum(len(b) + 512 for _, b in members)
        cur = self._cur
        if cur is None or cur.n_samples >= self.max_samples or (cur.n_samples and cur.n_bytes + size > self.max_bytes):
            self._finish()
            self._open()
        assert self._f is not None and self._cur is not None
        put = self._put
        for name, data in members:
            for part in _member_bytes(name, data):
                put(part)  # no joining: the image bytes are hashed and written without a copy
        self._cur.n_samples += 1
        self._cur.n_bytes += size
        self._cur.ids.append(sample.id)
        if self._pending_n >= self._BATCH:
            self._submit()
        return self._cur.name

    def _finish(self) -> None:
        if self._f is None or self._cur is None:
            return
        self._put(_end_of_archive(self._offset))
        self._drain()
        self._cur.n_bytes = self._offset
        self._cur.sha256 = self._hash.hexdigest()
        if self.local:
            self._f.close()
            os.replace(self._tmp, f"{self.root}/{self._cur.path.rsplit('/', 1)[-1]}")
        else:
            with fsspec.open(self._cur.path, "wb") as f:
                f.write(self._f.getbuffer())
        self.shards.append(self._cur)
        self._f = self._cur = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard and return all written shards."""
        self._finish()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hash_and_write(h: "hashlib._Hash", f, parts: list[bytes]) -> None:
    # one join per ~1 MB batch: a single sha256 update and a single write, both outside the GIL
    data = b"".join(parts)
    h.update(data)
    f.write(data)


def write_shards(samples: Iterable[Sample], out_dir: str, prefix: str = "shard", max_samples: int = 1000,
                 max_bytes: int = 256 << 20) -> list[ShardInfo]:
    """Write samples (image_bytes loaded) to WDS shards in order; returns the shards' info."""
    with ShardWriter(out_dir, prefix, max_samples, max_bytes) as w:
        for s in samples:
            w.write(s)
    return w.shards


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def list_shards(path: str) -> list[str]:
    """Sorted `.tar` shard URLs under a local dir / fsspec URL, or matching a brace/glob pattern."""
    if any(c in path for c in "{*?["):
        import braceexpand

        out: list[str] = []
        for p in braceexpand.braceexpand(path):
            out.extend(fsspec.open_files(p)) if any(c in p for c in "*?[") else out.append(p)
        return sorted(o if isinstance(o, str) else o.full_name for o in out)
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isfile(root):
        return [path]
    names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return names if proto in ("file", "local") else [f"{proto}://{p}" for p in names]


@dataclass
class _Group:
    key: str
    json_bytes: bytes | None = None
    images: dict[int, tuple[str, bytes | _PlainMember]] = field(default_factory=dict)  # member or its data
    problem: tuple[str, str] | None = None  # (reason, detail) seen while collecting


_MEMBER_RE = re.compile(r"([A-Za-z0-9_-]+)\.(?:(json)|(?:(\d{1,4})\.)?([a-z]{3,4}))")


def _member_problem(name: str) -> tuple[str, str, int] | str:
    """Split a member name into (key, kind, image index) or return a reason string if unsafe."""
    m = _MEMBER_RE.fullmatch(name)
    if m is not None:  # fast path for the well-formed names (no slash, one safe key, known suffix shape)
        if m.group(2):
            return m.group(1), "json", -1
        if m.group(4) in IMAGE_EXTS:
            return m.group(1), "image", int(m.group(3)) if m.group(3) is not None else 0
        return "unsafe_member_name"
    p = PurePosixPath(name)
    if name.startswith("/") or ".." in p.parts or len(p.parts) != 1:
        return "unsafe_member_name"
    key, dot, suffix = name.partition(".")
    if not dot or not _KEY_RE.match(key):
        return "unsafe_member_name"
    m = _SUFFIX_RE.match(suffix)
    if not m:
        return "unsafe_member_name"
    if suffix == "json":
        return key, "json", -1
    if m.group(2) not in IMAGE_EXTS:
        return "unsafe_member_name"
    return key, "image", int(m.group(1)) if m.group(1) is not None else 0


class _Quarantine:
    """Quarantine sink shared by readers: writes ledger rows and counts reasons."""

    def __init__(self, ledger: LedgerWriter | None, shard: str):
        self.ledger, self.shard = ledger, shard
        self.counts: dict[str, int] = {}

    def __call__(self, sample_id: str, reason: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        log.warning("quarantine %s (%s): %s %s", sample_id, self.shard, reason, detail[:200])
        if self.ledger is not None:
            self.ledger.add(sample_id, "quarantine", reason, shard=self.shard, detail=detail[:500])


class _TailTracker:
    """File wrapper that remembers the stream length and its last bytes, to detect tars that end
    without the end-of-archive blocks (tarfile's stream mode treats such a cut as a clean end)."""

    def __init__(self, f):
        self.f, self.total, self.tail = f, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def truncated(self) -> bool:
        while self.read(1 << 20):
            pass
        return self.total % 512 != 0 or self.tail != b"\0" * 1024


def _local_path(url: str, storage_options: dict | None) -> str | None:
    """The plain file path of a local shard (read with seeks, no fsspec), or None for other URLs."""
    if storage_options:
        return None
    if "://" not in url:
        return url
    if url.startswith("file://"):
        return url[len("file://"):]
    return None


@dataclass(slots=True)
class _PlainMember:
    """A regular-file member found by `_scan_plain` (the fields of tarfile.TarInfo the reader uses)."""

    name: str
    size: int
    offset_data: int
    type = tarfile.REGTYPE

    def isfile(self) -> bool:
        return True


_ZERO_BLOCK = tarfile.NUL * tarfile.BLOCKSIZE
_PAX_PATH_RE = re.compile(rb"\d+ path=([^\n]*)\n")


def _scan_plain(fd: int, total: int) -> list[_PlainMember] | None:
    """The members of a local shard when it is exactly what `ShardWriter` writes: every header equal byte
    for byte to `_member_header(name, size)` (fixed metadata, valid checksum; tarfile's PAX sequence for a
    long name), data inside the file, then nothing but zeros with at least the two end blocks. None for
    anything else (other tar writers, corrupt or cut shards, empty archives): tarfile then parses the
    shard and reports its damage. Comparing whole headers with the writer's bytes is the exactness
    argument: such a header says nothing tarfile would read differently, so the members (names, sizes,
    offsets, all regular files) are the ones tarfile yields, for ~1/6 of tarfile's per-header cost."""
    bs = tarfile.BLOCKSIZE
    out: list[_PlainMember] = []
    off = 0
    while True:
        hdr = os.pread(fd, bs, off)
        if len(hdr) < bs:
            return None  # cut at or inside a header
        if hdr == _ZERO_BLOCK:
            break
        if hdr[156:157] == tarfile.XHDTYPE:  # PAX record carrying a long name, then the USTAR header
            try:
                n_rec = int(hdr[124:135], 8)
            except ValueError:
                return None
            head_len = 2 * bs + n_rec + (-n_rec) % bs
            if off + head_len > total:  # also keeps a garbage record size from allocating gigabytes
                return None
            blob = os.pread(fd, head_len, off)
            m = _PAX_PATH_RE.fullmatch(blob[bs:bs + n_rec])
            if len(blob) < head_len or m is None:
                return None
            raw_name, last = m.group(1), blob[-bs:]
        else:
            end = hdr.find(tarfile.NUL, 0, tarfile.LENGTH_NAME)
            raw_name, last, head_len, blob = hdr[:end if end >= 0 else tarfile.LENGTH_NAME], hdr, bs, hdr
        try:
            size = int(last[124:135], 8)
        except ValueError:
            return None
        name = raw_name.decode(tarfile.ENCODING, "surrogateescape")
        if blob != _member_header(name, size):
            return None
        data = off + head_len
        if data + size > total:
            return None  # cut inside the data
        out.append(_PlainMember(name, size, data))
        off = data + size + (-size) % bs
    if not out or total % bs or total - off < 2 * bs:
        return None
    while off < total:  # all that follows the first zero block must be zeros (the end-of-archive record)
        chunk = os.pread(fd, min(1 << 20, total - off), off)
        if not chunk or chunk.count(0) != len(chunk):
            return None
        off += len(chunk)
    return out


class _LocalTar:
    """Members of a local tar read with seeks, member data read straight from the file (one copy, only
    when asked for). Shards exactly as ShardWriter writes them are indexed by `_scan_plain`; any other
    tar is parsed by tarfile, which raises tarfile.ReadError where the archive is cut: inside a member,
    or where tarfile would silently stop (size not a multiple of 512, or no two zero blocks at the end)
    -- the same checks as the streaming path."""

    def __init__(self, path: str):
        self.path = path
        self.f = None
        self.fd = -1
        self.lazy = False  # True once `_scan_plain` indexed the shard: image data may be read on demand

    def __iter__(self) -> Iterator[tarfile.TarInfo | _PlainMember]:
        self.f = f = open(self.path, "rb", buffering=1 << 16)  # closed by close(): lazy reads follow
        self.fd = f.fileno()
        size = os.fstat(self.fd).st_size
        plain = _scan_plain(self.fd, size)
        if plain is not None:
            self.lazy = True
            yield from plain
        else:
            tar = tarfile.open(fileobj=f, mode="r:")
            yield from tar
            # tarfile also stops silently at a corrupt header mid-archive: all that follows must be zeros.
            f.seek(tar.offset)
            while chunk := f.read(1 << 20):
                if chunk.strip(b"\0"):
                    raise tarfile.ReadError(f"unreadable tar header at byte {tar.offset}: the rest of the shard is lost")
            f.seek(max(0, size - 1024))
            if size % 512 != 0 or size < 1024 or f.read(1024) != b"\0" * 1024:
                raise tarfile.ReadError(f"tar ends without end-of-archive blocks after {size} bytes")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f, self.fd = None, -1

    def read(self, m: tarfile.TarInfo | _PlainMember) -> bytes:
        if not m.size:
            return b""
        data = os.pread(self.fd, m.size, m.offset_data)
        if len(data) != m.size:
            raise tarfile.ReadError("unexpected end of data")
        return data


class _StreamTar:
    """Members of a tar streamed through fsspec (s3://, gs://, ...) in one forward pass."""

    lazy = False  # one forward pass: every member is read as it streams by

    def __init__(self, url: str, storage_options: dict | None):
        self.url, self.storage_options = url, storage_options or {}
        self.tar: tarfile.TarFile | None = None

    def close(self) -> None:
        pass  # the stream is closed by __iter__

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        with fsspec.open(self.url, "rb", **self.storage_options) as raw:
            f = _TailTracker(raw)
            self.tar = tarfile.open(fileobj=f, mode="r|")
            yield from self.tar
            if f.truncated():
                raise tarfile.ReadError(f"tar ends without end-of-archive blocks after {f.total} bytes")

    def read(self, m: tarfile.TarInfo) -> bytes:
        return self.tar.extractfile(m).read() if m.size else b""


def iter_shard(
    url: str,
    *,
    quarantine: LedgerWriter | None = None,
    include_ids: set[str] | frozenset[str] | None = None,
    load_images: bool = True,
    verify_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_text_chars: int = MAX_TEXT_CHARS,
    storage_options: dict | None = None,
) -> Iterator[Sample]:
    """Stream the valid samples of one shard; quarantine the rest with a reason.

    `include_ids` restricts both output and quarantine rows to the ids that are inputs of the calling
    step (others are skipped silently: they were decided by an earlier step). Ids in `include_ids` that
    are never met in this shard are NOT reported here; see `iter_samples(expected=...)`.
    """
    sname = shard_name(url)
    q = _Quarantine(quarantine, sname)
    seen: set[str] = set()

    def finish(g: _Group) -> Sample | None:
        fallback_id = f"{sname}/{g.key}"
        if g.json_bytes is None:
            if include_ids is None or fallback_id in include_ids:
                q(fallback_id, g.problem[0] if g.problem else "missing_json", f"members without {g.key}.json")
            return None
        sid = fallback_id
        try:
            if len(g.json_bytes) > MAX_JSON_BYTES:
                raise SampleError("oversize_text", f"{len(g.json_bytes)} bytes of json")
            try:
                text = g.json_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SampleError("non_utf8", str(e)) from None
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise SampleError("invalid_json", str(e)) from None
            if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) and str(rec["id"]).strip():
                sid = str(rec["id"])
            if include_ids is not None and sid not in include_ids:
                return None
            if g.problem:
                raise SampleError(*g.problem)
            s = Sample.from_record(rec, max_text_chars=max_text_chars)
            sid = s.id
            if sid in seen:
                raise SampleError("duplicate_id", f"id {sid} appears twice in shard")
            if len(g.images) != len(s.images) or sorted(g.images) != list(range(len(s.images))):
                raise SampleError("missing_image", f"record names {len(s.images)} images, shard has {len(g.images)}")
            if load_images:
                s.image_bytes = [image_data(g.images[i][1]) for i in range(len(s.images))]
                if verify_images:
                    for b in s.image_bytes:
                        decode_image(b, max_pixels)
            s.shard = sname
            seen.add(sid)
            return s
        except SampleError as e:
            if include_ids is None or sid in include_ids:
                q(sid, e.reason, e.detail)
            return None

    def image_data(x: bytes | _PlainMember) -> bytes:
        if isinstance(x, bytes):
            return x
        try:  # an indexed member lies inside the file: only a shard changed since the scan gets here
            return tar.read(x)
        except (tarfile.ReadError, OSError) as e:
            raise SampleError("truncated_tar", f"{type(e).__name__}: {e}") from None

    group: _Group | None = None
    local = _local_path(url, storage_options)
    tar = _LocalTar(local) if local is not None else _StreamTar(url, storage_options)
    try:  # the shard file stays open until the last sample is finished (lazy image reads)
        try:
            for m in tar:
                parsed = _member_problem(m.name)
                if isinstance(parsed, str) or not m.isfile():
                    reason = parsed if isinstance(parsed, str) else "unsafe_member_name"
                    bad_key = m.name.split("/")[-1].partition(".")[0] or "member"
                    if group is not None and bad_key == group.key:
                        group.problem = group.problem or (reason, m.name)
                    else:
                        qid = f"{sname}/{m.name}"
                        if include_ids is None or qid in include_ids:
                            q(qid, reason, f"member {m.name!r} type {m.type!r}")
                    continue
                key, kind, idx = parsed
                if group is None or key != group.key:
                    if group is not None and (s := finish(group)) is not None:
                        yield s
                    group = _Group(key)
                # images of an indexed shard are read only for samples that are wanted (a subset export
                # reads just its subset); elsewhere reads stay in member order, where a cut is detected
                data = m if tar.lazy and kind == "image" else tar.read(m)
                if kind == "json":
                    if group.json_bytes is not None:
                        group.problem = group.problem or ("duplicate_key", f"two json members for {key}")
                    group.json_bytes = data
                else:
                    if idx in group.images:
                        group.problem = group.problem or ("duplicate_key", f"two image members #{idx} for {key}")
                    group.images[idx] = (m.name, data)
        except (tarfile.ReadError, EOFError, OSError, tarfile.HeaderError) as e:
            # A truncated/corrupt tar: the group in flight cannot be trusted; later samples are unreadable
            # and are reported by iter_samples(expected=...) as missing_from_shard.
            if group is not None:
                group.problem = ("truncated_tar", f"{type(e).__name__}: {e}")
                finish(group)
                group = None
            log.error("shard %s is truncated or corrupt: %s", url, e)
            if include_ids is None:  # ingest-style read: record the shard-level loss itself
                q(f"{sname}/__truncated__", "truncated_tar", f"{type(e).__name__}: {e}")
        if group is not None and (s := finish(group)) is not None:
            yield s
    finally:
        tar.close()


def iter_samples(
    urls: Iterable[str],
    *,
    quarantine: LedgerWriter | None = None,
    include_ids: set[str] | frozenset[str] | None = None,
    expected: bool = True,
    **kwargs,
) -> Iterator[Sample]:
    """Stream samples of several shards in order (see `iter_shard`).

    With `include_ids` and `expected=True`, ids that were expected but never met (e.g. lost to a
    truncated shard) are quarantined as `missing_from_shard` at the end, so no input vanishes.
    """
    met: set[str] = set()
    for url in urls:
        for s in iter_shard(url, quarantine=quarantine, include_ids=include_ids, **kwargs):
            met.add(s.id)
            yield s
    if include_ids is not None and expected and quarantine is not None:
        for sid in sorted(set(include_ids) - met - quarantine.decided):
            quarantine.add(sid, "quarantine", "missing_from_shard", detail="expected input not found in any shard")
