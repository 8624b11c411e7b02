"""Image reads from an async fsspec filesystem (s3fs, gcsfs, http) as coroutines on the filesystem's own event loop,
for `core.io.pool.read_ahead(..., aread=...)`.

fsspec's sync `fs.cat_file` on such a filesystem hands a coroutine to the filesystem's event-loop thread and blocks
until it is done; called from N pool threads, every request adds a pool thread's wake-up and a hop to the loop
and back. Run on the loop directly, a read is one task there. The request itself dominates: ~1.3 ms of client
CPU per GET (botocore: request building, signing, event hooks, response parsing). Measured with
benchmarks/ingest_s3.py (moto on loopback, +20 ms per GET, 16 readers, 2 cores, load <= 0.8): 410-446 images/s
and 1.9-2.2 ms of client CPU per image on the loop vs 335-396 images/s and 2.0-2.7 ms from threads (speedup
10.3-10.9x vs 8.4-9.7x). On a loaded machine (load >= 3) the two were even: threads win CPU share there.

`read_object` is the coroutine twin of `core.io.ingest._read_remote_image`: the same request (one ranged GET,
`bytes=0-max_bytes`, no HEAD first) and the same outcomes, so an ingest's decisions do not depend on which of the
two read an image (tests/unit/test_io_pool.py compares whole ingests, 1 reader vs 16, on S3).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from core.foundation.sample import SampleError
from core.io.pool import AsyncRead


async def read_object(fs: Any, path: str, name: str, max_bytes: int) -> bytes:
    """The bytes of object `path` (image `name`), at most `max_bytes`, in one ranged read; a missing object or a
    "folder" (a key prefix) -> SampleError(missing_image), more than `max_bytes` -> SampleError(oversize_image)."""
    try:
        try:
            data = await fs._cat_file(path, start=0, end=max_bytes + 1)
        except OSError as e:  # a range on an empty object is refused (HTTP 416, InvalidRange -> EINVAL)
            if getattr(e, "errno", None) != errno.EINVAL:
                raise
            data = b""
        if len(data) > max_bytes:
            raise SampleError("oversize_image", f"{name}: more than max_image_bytes={max_bytes} bytes")
        if not data and await fs._isdir(path):  # an object store's "folder" reads as b"": no such image
            raise SampleError("missing_image", f"{name}: IsADirectoryError")
        return data
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise SampleError("missing_image", f"{name}: {type(e).__name__}") from None


def async_image_reader(fs: Any, path_of: Callable[[str], str], max_bytes: int) -> AsyncRead | None:
    """`read_object(fs, path_of(name), name, max_bytes)` on `fs.loop`, for `read_ahead(..., aread=...)`; `path_of`
    is the caller's path check (it raises for unsafe names, inside the read, as the sync read does). None when
    `fs` is not an async fsspec filesystem driven by fsspec's own loop (local disk, memory, an `asynchronous=True`
    instance on the caller's loop): those are read by the thread pool."""
    if not getattr(fs, "async_impl", False) or getattr(fs, "asynchronous", True) or getattr(fs, "loop", None) is None:
        return None

    async def read(name: str) -> bytes:
        return await read_object(fs, path_of(name), name, max_bytes)

    return AsyncRead(read, fs.loop)
