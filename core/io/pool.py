"""Ordered read-ahead through a bounded pool: a record's files (images) are fetched while earlier records
are still being processed, and the consumer sees records, and each record's reads, in the original order.

Reading one image from an object store is one request of ~10-50 ms of latency and almost no CPU; read one
after another, latency is the whole cost (ingest at 30 ms per GET: ~100 h for 12M images). A bounded pool
keeps `max_workers` requests in flight per worker process, for at most `window` records ahead: threads for a
blocking `read` (local disk), or, given `aread` (an async filesystem such as s3fs), coroutines on that
filesystem's own event loop, where its requests run anyway (no thread per request, no hop from a pool thread
to the loop and back; see core/io/remote.py).

Decisions stay exactly those of a serial read: the consumer asks for each name in order (`Ahead.read`), and a
read's exception is raised at that point, as the serial read raised it; reads of records the consumer never
asks about (a record rejected before its images are read) are simply dropped. With `max_workers=1` nothing is
read ahead: every read happens on demand, in the caller's thread, with `read`, as before.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class AsyncRead:
    """A read as a coroutine, `fn(name) -> bytes`, and the running event loop it must run on (for fsspec's async
    filesystems, `fs.loop`: their client sessions belong to it). `read_ahead` runs these reads on that loop."""

    fn: Callable[[str], Awaitable[bytes]]
    loop: asyncio.AbstractEventLoop


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


class _OnLoop:
    """Reads run as tasks on `aread.loop`, at most `limit` at once (an asyncio semaphore, taken in submission
    order); each `submit` returns a concurrent Future the consumer's thread waits on."""

    def __init__(self, aread: AsyncRead, limit: int):
        self.fn, self.loop = aread.fn, aread.loop
        self.sem = asyncio.Semaphore(limit)  # binds to the loop on first use (Python >= 3.10)
        self.started: set[asyncio.Task] = set()
        self.closed = False  # set on the loop by `_shutdown`: a read that has not started never starts

    async def _run(self, name: str) -> bytes:
        if self.closed:
            raise asyncio.CancelledError
        task = asyncio.current_task()
        self.started.add(task)
        try:
            async with self.sem:
                if self.closed:
                    raise asyncio.CancelledError
                return await self.fn(name)
        finally:
            self.started.discard(task)

    def submit(self, name: str) -> Future:
        return asyncio.run_coroutine_threadsafe(self._run(name), self.loop)

    async def _shutdown(self) -> None:
        self.closed = True
        tasks = list(self.started)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """On the loop, in one step: no queued read starts any more, running ones are cancelled; returns when
        they have ended (all in one coroutine, so no read slips in between cancellations made from this thread)."""
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _prepare(item: T, prepare: Callable[[T], tuple[Any, Sequence[str]]], read: Callable[[str], bytes],
             submit: Callable[[str], Future] | None) -> Ahead[T]:
    ahead: Ahead[T] = Ahead(item, read)
    try:
        ahead._value, names = prepare(item)
    except Exception as e:  # kept and raised at the consumer's `prepared()`, in order
        ahead._error = e
        return ahead
    if submit is not None:
        for name in dict.fromkeys(names):  # a name twice in one record: one read
            ahead._futures[name] = submit(name)
    return ahead


def read_ahead(items: Iterable[T], prepare: Callable[[T], tuple[Any, Sequence[str]]], read: Callable[[str], bytes],
               max_workers: int = 16, window: int | None = None, aread: AsyncRead | None = None) -> Iterator[Ahead[T]]:
    """Yield an `Ahead` per item, in order, while up to `max_workers` reads of the names that
    `prepare(item) -> (value, names)` returned for the next `window` items (default 4 x max_workers) run ahead.

    Without `aread`, `read(name) -> bytes` runs in `max_workers` pool threads (it must be thread-safe: fsspec's
    local and s3 filesystems are). With `aread` (same bytes, same exceptions as `read`), the reads run as
    coroutines on `aread.loop`, `max_workers` at once; `read` still serves names not read ahead and
    `max_workers=1`. Do not iterate from a coroutine running on `aread.loop` (its reads could never run).
    Memory: at most `window` items' reads are held. Close the iterator (`contextlib.closing`) to stop early:
    queued reads are cancelled and running ones finish (threads) or are cancelled (coroutines) before it returns.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers={max_workers} out of range; valid: [1, inf)")
    if max_workers == 1:
        for item in items:
            yield _prepare(item, prepare, read, None)
        return
    window = window or 4 * max_workers
    pending: deque[Ahead[T]] = deque()
    if aread is not None:
        if _on_loop(aread.loop):
            raise RuntimeError("read_ahead with aread must not run on aread.loop: its reads would wait on themselves")
        on_loop = _OnLoop(aread, max_workers)
        submit, shutdown = on_loop.submit, on_loop.close
    else:
        pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="read-ahead")
        submit, shutdown = partial(pool.submit, read), lambda: pool.shutdown(wait=True, cancel_futures=True)
    try:
        for item in items:
            pending.append(_prepare(item, prepare, read, submit))
            if len(pending) > window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        shutdown()

