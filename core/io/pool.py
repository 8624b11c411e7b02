"""Ordered read-ahead through a bounded thread pool: a record's files (images) are fetched while earlier records
are still being processed, and the consumer sees records, and each record's reads, in the original order.

Reading one image from an object store is one request of ~10-50 ms of latency and almost no CPU; read one
after another, latency is the whole cost (ingest at 30 ms per GET: ~100 h for 12M images). A bounded pool
(`max_workers` threads, at most `window` records ahead) keeps that many requests in flight per worker process.

Decisions stay exactly those of a serial read: the consumer asks for each name in order (`Ahead.read`), and a
read's exception is raised at that point, as the serial read raised it; reads of records the consumer never
asks about (a record rejected before its images are read) are simply dropped. With `max_workers=1` nothing is
read ahead: every read happens on demand, in the caller's thread, as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Ahead(Generic[T]):
    """One item with what was prepared for it ahead of time: `prepared()` (the prepare step's value, or its
    exception re-raised) and `read(name)` (the bytes fetched ahead, or fetched now when they were not)."""

    item: T
    _read: Callable[[str], bytes]
    _value: Any = None
    _error: BaseException | None = None
    _futures: dict[str, Future] = field(default_factory=dict)

    def prepared(self) -> Any:
        """The value `prepare(item)` returned; raises what it raised, where the caller asks for it."""
        if self._error is not None:
            raise self._error
        return self._value

    def read(self, name: str) -> bytes:
        """The bytes of `name`: the read-ahead result (its exception re-raised here), or a read now."""
        fut = self._futures.get(name)
        return fut.result() if fut is not None else self._read(name)


def _prepare(item: T, prepare: Callable[[T], tuple[Any, Sequence[str]]], read: Callable[[str], bytes],
             pool: ThreadPoolExecutor | None) -> Ahead[T]:
    ahead: Ahead[T] = Ahead(item, read)
    try:
        ahead._value, names = prepare(item)
    except Exception as e:  # kept and raised at the consumer's `prepared()`, in order
        ahead._error = e
        return ahead
    if pool is not None:
        for name in dict.fromkeys(names):  # a name twice in one record: one read
            ahead._futures[name] = pool.submit(read, name)
    return ahead


def read_ahead(items: Iterable[T], prepare: Callable[[T], tuple[Any, Sequence[str]]], read: Callable[[str], bytes],
               max_workers: int = 16, window: int | None = None) -> Iterator[Ahead[T]]:
    """Yield an `Ahead` per item, in order, while up to `max_workers` threads read the names that
    `prepare(item) -> (value, names)` returned for the next `window` items (default 4 x max_workers).

    `read(name) -> bytes` runs in the pool threads (it must be thread-safe: fsspec's local and s3 filesystems
    are). Memory: at most `window` items' reads are held. Close the iterator (`contextlib.closing`) to stop
    early: queued reads are cancelled and running ones finish before it returns.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers={max_workers} out of range; valid: [1, inf)")
    if max_workers == 1:
        for item in items:
            yield _prepare(item, prepare, read, None)
        return
    window = window or 4 * max_workers
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="read-ahead")
    try:
        pending: deque[Ahead[T]] = deque()
        for item in items:
            pending.append(_prepare(item, prepare, read, pool))
            if len(pending) > window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
