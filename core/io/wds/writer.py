"""WDS shard writer: `ShardWriter` / `write_shards` write `key.json` (LLaVA record) plus `key.<ext>` (one image)
or `key.<i>.<ext>` (several), image bytes untouched, with fixed tar metadata (core/io/wds/members.py)."""

from __future__ import annotations

import hashlib
import io
import os
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.foundation.outputs import temp_path
from core.foundation.sample import Sample
from core.io.wds.members import _end_of_archive, _member_bytes, sample_members, shard_name


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
            # written in place under a unique temp name (no in-memory copy of the shard; two writers of one
            # folder, even on two pods, never share it), renamed when complete
            self._tmp = temp_path(f"{self.root}/{name}")
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
