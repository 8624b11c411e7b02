"""Tar access for the readers: a local shard read with seeks (indexed without tarfile when it is exactly what
`ShardWriter` writes), an fsspec URL streamed in one forward pass; both detect cut archives."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from core.io.wds.members import _member_header


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
        return self.tar.extractfile(m).read(m.size) if m.size else b""  # the caller bounds m.size

