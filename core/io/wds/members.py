"""The tar format of WDS shards: member names (`key.json`, `key.<ext>`, `key.<i>.<ext>`), their parsing, and
the exact header bytes the writer emits (fixed metadata, so equal inputs give byte-identical shards)."""

from __future__ import annotations

import re
import tarfile
from pathlib import PurePosixPath

from core.foundation.sample import Sample
from core.io.images import IMAGE_EXTS, image_ext

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SUFFIX_RE = re.compile(r"^(?:json|(?:(\d{1,4})\.)?([a-z]{3,4}))$")


def shard_name(url: str) -> str:
    """`s3://b/x/shard-000001.tar` -> `shard-000001` (used for ledger parts and per-shard outputs)."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".tar") else base



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
# `_create_header` (~60 us) per member; tests/unit/test_wds_io.py compares the two over many names and sizes.
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
    if not dot or not _KEY_RE.fullmatch(key):  # fullmatch: `$` would accept a trailing newline
        return "unsafe_member_name"
    m = _SUFFIX_RE.fullmatch(suffix)
    if not m:
        return "unsafe_member_name"
    if suffix == "json":
        return key, "json", -1
    if m.group(2) not in IMAGE_EXTS:
        return "unsafe_member_name"
    return key, "image", int(m.group(1)) if m.group(1) is not None else 0

