"""Soup URIs and the eval-worker store that merges a soup from the downloaded expert checkpoints.

A soup is named by a URI the eval runner treats like a checkpoint URI: `soup/<spec>` with
`<spec>` = `charts+docs` (uniform) or `charts=0.7+docs=0.3` (weights). `SoupStore.fetch(uri)` downloads the
subset's experts one at a time (through the runner's `CheckpointStore`), folds each into a `SoupBuilder` and
deletes it, then returns the soup folder; `release` deletes the soup. So a worker holds one soup (plus one
expert while merging), and the number of soups on disk at once is the eval fan-out's cap, not 2^k.

Every fetch/release is logged as an interval (`HoldLog`); `peak_held(intervals)` is the measured maximum
number of soups materialised at once across workers (each Flyte worker writes its own log).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.evals.checkpoints import CheckpointStore
from core.mixing.domains import check_domain_name
from core.mixing.merge import SoupBuilder, normalize_weights

PREFIX = "soup/"


def soup_uri(domains: Sequence[str], weights: Sequence[float] | None = None) -> str:
    """`soup/a+b` (uniform) or `soup/a=0.7+b=0.3`; domains sorted so a subset has one name."""
    if not domains:
        raise ValueError("empty subset")
    for d in domains:
        check_domain_name(d)  # no `+`, `=`, `/`; never `.` or `..`
    if weights is None:
        return PREFIX + "+".join(sorted(domains))
    pairs = sorted(zip(domains, weights))
    return PREFIX + "+".join(f"{d}={w:g}" for d, w in pairs)


def parse_soup_uri(uri: str) -> tuple[list[str], list[float] | None]:
    """Inverse of `soup_uri`: (domains, weights or None)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1] if uri.startswith(PREFIX) or "/soup/" in uri else ""
    if not name:
        raise ValueError(f"not a soup uri: {uri!r}")
    parts = name.split("+")
    for p in parts:
        check_domain_name(p.split("=", 1)[0])
    if all("=" in p for p in parts):
        return [p.split("=", 1)[0] for p in parts], [float(p.split("=", 1)[1]) for p in parts]
    if any("=" in p for p in parts):
        raise ValueError(f"mixed weighted/unweighted soup uri {uri!r}")
    return parts, None


def subset_key(domains: Iterable[str]) -> str:
    """Canonical subset name (`a+b`), the row key of score tables."""
    return "+".join(sorted(domains))


@dataclass
class HoldLog:
    """Intervals (kind, name, t_start, t_end) of things held on local disk; thread-safe."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _open: dict[str, tuple[str, str, float]] = field(default_factory=dict, repr=False)

    def start(self, key: str, kind: str, name: str) -> None:
        with self._lock:
            self._open[key] = (kind, name, time.time())

    def end(self, key: str) -> None:
        with self._lock:
            kind, name, t0 = self._open.pop(key)
            self.rows.append({"kind": kind, "name": name, "t_start": t0, "t_end": time.time(), "pid": os.getpid()})

    def write(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.rows, f)
        return path


def peak_held(intervals: Iterable[Mapping[str, Any]], kind: str = "soup") -> int:
    """Maximum number of intervals of `kind` open at the same time (sweep over start/end events)."""
    ev = []
    for r in intervals:
        if r["kind"] == kind:
            ev += [(r["t_start"], 1), (r["t_end"], -1)]
    cur = best = 0
    for _, d in sorted(ev, key=lambda x: (x[0], x[1])):  # an end before a start at the same instant
        cur += d
        best = max(best, cur)
    return best


class SoupStore(CheckpointStore):
    """A `CheckpointStore` for soup URIs: `fetch` merges the subset from its experts, `release` deletes it.

    experts: domain -> expert checkpoint URI (local path or fsspec URL); base: the shared start checkpoint
    (required for task arithmetic). Plain checkpoint URIs (not `soup/...`) pass through to the parent store,
    so the base and the trained mixtures can be evaluated by the same workers.
    """

    def __init__(self, experts: Mapping[str, str], base: str | None = None, method: str = "uniform",
                 local_dir: str = "", log: HoldLog | None = None, scale: float = 1.0,
                 probe: Callable[[str], Mapping[str, float]] | None = None):
        super().__init__(local_dir)
        self.probe = probe  # extra scores of the materialised model (held-out loss), run once per fetch
        self.probe_rows: list[dict[str, Any]] = []
        self.experts = dict(experts)
        self.base = base
        self.method = method
        self.scale = scale
        self.log = log if log is not None else HoldLog()
        self._base_local: str | None = None
        self._lock = threading.Lock()

    def fetch(self, uri: str) -> str:
        if not uri.startswith(PREFIX):
            local = super().fetch(uri)
            self.log.start(local, "soup", uri)
            self._probe(local, uri)
            return local
        domains, weights = parse_soup_uri(uri)
        missing = [d for d in domains if d not in self.experts]
        if missing:
            raise KeyError(f"no expert for domains {missing} (have {sorted(self.experts)})")
        method = self.method if weights is None or self.method != "uniform" else "weighted"
        w = normalize_weights(len(domains), method, weights, self.scale)
        base_local = self._base() if method == "task_arithmetic" else None
        dest = tempfile.mkdtemp(prefix="soup-", dir=self.local_dir)
        target = os.path.join(dest, uri.rsplit("/", 1)[-1])
        self.log.start(target, "soup", uri)
        try:
            b = SoupBuilder(method, base_local)
            for d, wi in zip(domains, w):
                local = super().fetch(self.experts[d])
                self.log.start(local, "expert", d)
                try:
                    b.add(local, wi)
                finally:
                    super().release(local)
                    self.log.end(local)
            b.finish(target, {"uri": uri, "domains": domains})
            self._probe(target, uri)
        except BaseException:
            self.log.end(target)
            CheckpointStore.release(self, target)
            raise
        return target

    def _probe(self, local: str, uri: str) -> None:
        if self.probe is not None:
            for name, v in self.probe(local).items():
                self.probe_rows.append({"checkpoint": uri, "benchmark": name, "score": float(v)})

    def release(self, local_path: str) -> None:
        super().release(local_path)
        self.log.end(local_path)

    def _base(self) -> str:
        """The base checkpoint, downloaded once per worker (it is the same for every soup)."""
        if self.base is None:
            raise ValueError("task_arithmetic needs base")
        with self._lock:
            if self._base_local is None:
                self._base_local = super().fetch(self.base)
                self.log.start(self._base_local, "base", self.base)
            return self._base_local

    def close(self) -> None:
        """Delete the worker's copy of the base."""
        if self._base_local is not None:
            CheckpointStore.release(self, self._base_local)
            self.log.end(self._base_local)
            self._base_local = None
