"""Publishing outputs that are never half-written, never stale and never written by two writers at once.

- `write_atomic` / `write_parquet_atomic` / `write_json_atomic`: the project's one atomic-write helper (a
  unique `mkstemp` temp file beside the target, renamed over it; whole-object writes on object stores).
  `temp_path` / `local_temp` give the same unique temp names to streaming writers (ledger, WDS shards).
- `fresh_dir` + `swap_in`: build a whole output folder beside the old one and swap it in (export, publish).
- `folder_lock`: one writer per folder, a clear `FolderBusy` naming the holder for the second.

Re-exported by `core.foundation.step`, whose shard-step base uses them.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq


# ---- atomic publication ---------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Publish `data` at `path` (local path or fsspec URL) so a reader sees the whole file or none of it.

    Local files: written to a unique sibling temp file (`local_temp`), then renamed (atomic on POSIX). Object
    stores publish a whole object on close, so they are written directly."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fs, p = fsspec.core.url_to_fs(str(path))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        with local_temp(p) as (f, _):
            f.write(raw)
        return
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    with fs.open(p, "wb") as f:
        f.write(raw)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import: os.umask can only be read by setting it, which would race with other threads later
_UMASK = _umask()
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp's 0600 would hide outputs from the team
_DIR_MODE = 0o777 & ~_UMASK  # what mkdir would give; mkdtemp's 0700 likewise


def temp_path(final: str | os.PathLike) -> str:
    """A fresh, unique temp file beside `final` (created empty, mode as `open()` would give): the name is
    `.<final name>.<random>.tmp`, so two writers of one file, on one host or on several pods sharing the
    folder, never write the same temp file (a pid alone repeats across pods), and no `*.parquet` / `*.tar`
    glob sees it."""
    d, base = os.path.split(os.fspath(final))
    os.makedirs(d or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=d or ".")
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def local_temp(final: str | os.PathLike) -> Iterator[tuple[Any, str]]:
    """`with local_temp(path) as (f, tmp):` write to `f`; on success the temp file replaces `path`
    atomically, on an error it is removed (no half file under the final name, no litter)."""
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as f:
            yield f, tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fresh_dir(final: str | os.PathLike, what: str = "building") -> str:
    """A new empty folder beside the local folder `final` (`.<name>.<what>-<random>`, same filesystem, so it
    can be renamed over `final`; mode as `mkdir` would give): build a whole output there, then `swap_in`."""
    final = os.path.abspath(os.fspath(final))
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    d = tempfile.mkdtemp(prefix=f".{name}.{what}-", dir=parent)
    os.chmod(d, _DIR_MODE)
    return d


def swap_in(staging: str | os.PathLike, final: str | os.PathLike) -> str | None:
    """Put the finished folder `staging` (from `fresh_dir`) at `final` whole: the old `final` is renamed
    aside first (`.<name>.old-<random>`, returned; None when there was none), then `staging` renamed to
    `final`. A reader never sees old and new files mixed; between the two renames `final` is briefly
    absent. Callers hold the folder's lock (`folder_lock(parent, ..., lock_name=...)`)."""
    final = os.path.abspath(os.fspath(final))
    aside = None
    if os.path.lexists(final):
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.rmdir(aside)  # keep only the unique name: `final` may be a file, which cannot replace a folder
        os.rename(final, aside)
    os.rename(os.fspath(staging), final)
    return aside


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """`write_atomic` of a Parquet table (pyarrow's default writer options)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(path, buf.getvalue())


def write_json_atomic(obj: Any, path: str | os.PathLike, **dumps: Any) -> None:
    """`write_atomic` of `json.dumps(obj, **dumps)` (UTF-8)."""
    write_atomic(path, json.dumps(obj, **dumps))


# ---- one writer per folder ------------------------------------------------------------------------
LOCK_FILE = ".writer.lock"


class FolderBusy(RuntimeError):
    """Another writer (this host or another one sharing the folder) holds the folder's writer lock."""


def _is_local(url: str | os.PathLike) -> bool:
    return isinstance(fsspec.core.url_to_fs(str(url))[0], fsspec.implementations.local.LocalFileSystem)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "", lock_name: str = LOCK_FILE) -> Iterator[Path | None]:
    """Hold the exclusive writer lock of `folder` (created if needed) for the `with` block.

    Local paths: `fcntl.flock(LOCK_EX | LOCK_NB)` on `<folder>/.writer.lock` (also across hosts on NFS v4,
    which maps flock to its own locks). The file records the holder (host, pid, time, `what`); a second
    writer raises `FolderBusy` naming it, at once. The kernel drops the lock when the holder dies, so a
    crash never leaves the folder locked; the file is removed on a clean release. Object-store URLs have no
    lock (yields None): there each task writes its own fresh prefix. `lock_name` names the lock of one
    entry of `folder` (an export folder swapped in whole is locked in its parent: `.<name>.writer.lock`)."""
    if not _is_local(folder):
        yield None
        return
    p = Path(fsspec.core.url_to_fs(str(folder))[1])
    p.mkdir(parents=True, exist_ok=True)
    path = p / lock_name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "(holder not yet recorded)"
            os.close(fd)
            raise FolderBusy(f"{p} is being written by another writer: {holder}; wait for it to finish or write "
                             f"to another folder (lock file {path})") from None
        try:  # the previous holder may have removed the file after we opened it: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info, sort_keys=True).encode(), 0)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # still holding the lock: a waiter that opened this file re-checks the inode
        os.close(fd)
