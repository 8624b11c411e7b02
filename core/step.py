"""The contract every per-shard curation step shares, written once.

A step reads *units* (ingested WDS shards, or per-shard embedding files), restricted to the ids the previous
step let through, and for each unit publishes its artifacts first and its ledger part
`<out>/ledger/<step>/part-<unit>.parquet` last, atomically. So:

- a unit whose ledger part exists is finished and skipped on re-run (resume after a crash or a retry);
- a crash leaves each unit either finished or absent, never half-written;
- one `LedgerWriter` per unit receives both the step's decisions and the reader's quarantines;
- ids the previous step passed that no unit held get a `quarantine` row (`missing_reason`) in
  `part-zz-missing.parquet`, so no sample vanishes between steps;
- a step with no units at all still writes an empty ledger part (a degenerate run stays balanced).

Writing a step (datatrove's `PipelineStep` idea, with the ledger as the completion record)::

    class Lengths(ShardStep):
        name = "lengths"
        def process(self, unit, led):
            for s in self.read(unit, led):                         # WDS shard, restricted to prev's ids
                led.add(s.id, "keep", score=len(s.conversations), shard=unit.name)

    Lengths(out_dir, prev=Passing.read(prev_dir, "ingest")).run(list_shards(f"{run}/shards"))

`process` may publish artifacts with `write_atomic` / `write_parquet_atomic` / `write_json_atomic` (the one
atomic-write helper of the project); a step whose units run elsewhere (Ray actors) uses `pending`,
`publish_part` and `finish` instead of `run`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from core.ledger import LedgerWriter, find_step_dir, read_ledger, step_dir

log = logging.getLogger(__name__)

MISSING_PART = "part-zz-missing"
EMPTY_PART = "part-empty"


# ---- atomic publication ---------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Publish `data` at `path` (local path or fsspec URL) so a reader sees the whole file or none of it.

    Local files: written to a sibling temp file, then renamed (atomic on POSIX). Object stores publish a
    whole object on close, so they are written directly."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fs, p = fsspec.core.url_to_fs(str(path))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        tmp = f"{p}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, p)
    else:
        fs.makedirs(os.path.dirname(p), exist_ok=True)
        with fs.open(p, "wb") as f:
            f.write(raw)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """`write_atomic` of a Parquet table (pyarrow's default writer options)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(path, buf.getvalue())


def write_json_atomic(obj: Any, path: str | os.PathLike, **dumps: Any) -> None:
    """`write_atomic` of `json.dumps(obj, **dumps)` (UTF-8)."""
    write_atomic(path, json.dumps(obj, **dumps))


# ---- where the inputs are -------------------------------------------------------------------------
def shards_of(path: str | os.PathLike) -> list[str]:
    """The WDS shard URLs of a run directory (its `shards/`) or of a shard folder, URL or glob.

    The one place that decides "run folder or shards folder": a directory with a `shards/` child is a run."""
    from core.wds import list_shards

    p = str(path).rstrip("/")
    fs, root = fsspec.core.url_to_fs(p)
    if not any(c in p for c in "{*?[") and fs.isdir(f"{root}/shards"):
        return list_shards(f"{p}/shards")
    return list_shards(p)


@dataclass(frozen=True)
class Passing:
    """The ids the previous step let through (keep or modify), by the shard the ledger names, in ledger order.

    The single form in which a step receives its inputs: `Passing.read(prev, prev_step)` from a run or
    step output directory, `Passing.of(ids)` from a plain id list (no shard information)."""

    step: str
    by_shard: Mapping[str, Sequence[str]]
    ids: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", frozenset(i for v in self.by_shard.values() for i in v))

    @classmethod
    def read(cls, prev: str | os.PathLike | Sequence[str | os.PathLike] | None, prev_step: str) -> Passing | None:
        """The passing ids of `ledger/<prev_step>/` found in `prev` (one directory or several step outputs);
        None when `prev_step` is empty or `prev` is None (the step then takes every sample of its units)."""
        if not prev_step or prev is None:
            return None
        return cls.from_ledger(read_ledger(find_step_dir(prev, prev_step)), prev_step)

    @classmethod
    def from_ledger(cls, ledger: Any, step: str = "") -> Passing:
        """From a ledger DataFrame (`core.ledger.read_ledger`)."""
        from core.ledger import PASSING

        ok = ledger[ledger["decision"].isin(PASSING)]
        by: dict[str, list[str]] = {}
        for sid, shard in zip(ok["sample_id"].tolist(), ok["shard"].fillna("").tolist()):
            by.setdefault(str(shard), []).append(str(sid))
        return cls(step, by)

    @classmethod
    def of(cls, ids: Iterable[str], step: str = "") -> Passing:
        """From a plain id list (shard unknown)."""
        return cls(step, {"": list(dict.fromkeys(str(i) for i in ids))})

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def in_shard(self, shard: str) -> set[str]:
        """Ids the ledger places in `shard` (empty when the previous ledger did not record shards)."""
        return set(self.by_shard.get(shard, ()))


# ---- the step --------------------------------------------------------------------------------------
@dataclass
class Unit:
    """One unit of work: its URL (shard or file) and the name its outputs carry (`part-<name>.parquet`)."""

    url: str
    name: str


@dataclass
class StepSummary:
    """What one `run` did: units processed/skipped, decision and reason counts of the processed units, the
    per-unit results `process` returned, wall seconds."""

    step: str
    n_units: int = 0
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    missing: int = 0
    seconds: float = 0.0

    def add(self, led: LedgerWriter) -> None:
        for k, v in led.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for k, v in led.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "n_units": self.n_units, "units_done": len(self.done),
                "units_skipped": len(self.skipped), "counts": dict(self.counts), "reasons": dict(self.reasons),
                "missing": self.missing, "seconds": round(self.seconds, 2)}


class ShardStep:
    """Base of a per-unit step. Subclasses set `name` and implement `process(unit, led)`.

    :param out: the step's output directory (receives `ledger/<name>/` and the step's artifacts).
    :param prev: the previous step's passing ids (`Passing.read(prev_dir, prev_step)`), or None for all.
    """

    name: ClassVar[str] = ""
    missing_reason: ClassVar[str] = "missing_from_shard"
    missing_detail: ClassVar[str] = "input id not found in any shard"

    def __init__(self, out: str | os.PathLike, prev: Passing | None = None):
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set the class attribute `name`")
        self.out = Path(out)
        self.prev = prev
        self._ready = False

    # -- what subclasses write --------------------------------------------------------------------------
    def setup(self) -> None:
        """Load what processing needs (a model...): called once, before the first unfinished unit only."""

    def process(self, unit: Unit, led: LedgerWriter) -> Any:
        """Decide about every input sample of `unit` into `led`; publish the unit's artifacts before returning.
        The returned value is kept in `StepSummary.results[unit.name]`."""
        raise NotImplementedError

    def visit_finished(self, unit: Unit) -> None:
        """Called for a unit skipped because its ledger part exists (steps that aggregate over all units)."""

    def unit_name(self, url: str) -> str:
        from core.wds import shard_name

        return shard_name(url)

    # -- the contract -----------------------------------------------------------------------------------
    @property
    def ledger_dir(self) -> Path:
        return step_dir(self.out, self.name)

    def part(self, unit_name: str) -> Path:
        return self.ledger_dir / f"part-{unit_name}.parquet"

    def is_done(self, unit_name: str) -> bool:
        return self.part(unit_name).exists()

    def units(self, urls: Sequence[str]) -> list[Unit]:
        units = [Unit(u, self.unit_name(u)) for u in urls]
        if len({u.name for u in units}) != len(units):
            raise ValueError(f"{self.name}: two inputs share a unit name; their outputs would collide")
        return units

    def pending(self, urls: Sequence[str]) -> tuple[list[Unit], list[Unit]]:
        """(units to process, units already finished)."""
        units = self.units(urls)
        return [u for u in units if not self.is_done(u.name)], [u for u in units if self.is_done(u.name)]

    def read(self, unit: Unit, led: LedgerWriter, **kw: Any) -> Iterator[Any]:
        """The unit's samples (a WDS shard), restricted to the previous step's ids; unreadable records go to
        `led` as quarantines. `kw` go to `core.wds.iter_shard` (load_images, verify_images...)."""
        from core.wds import iter_shard

        kw.setdefault("load_images", False)
        kw.setdefault("verify_images", False)
        return iter_shard(unit.url, quarantine=led, include_ids=self.include, **kw)

    @property
    def include(self) -> frozenset[str] | None:
        """The previous step's ids (shared, not copied: a 12M-id set is not rebuilt per unit)."""
        return None if self.prev is None else self.prev.ids

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def run(self, urls: Sequence[str]) -> StepSummary:
        """Process every unfinished unit in order, then account for missing ids. Returns the summary."""
        t0 = time.perf_counter()
        todo, finished = self.pending(urls)
        summary = StepSummary(self.name, n_units=len(urls), skipped=[u.name for u in finished])
        if finished:
            log.info("%s: %d/%d units already done, skipping them", self.name, len(finished), len(urls))
        todo_names = {u.name for u in todo}
        for i, unit in enumerate(self.units(urls)):
            if unit.name not in todo_names:
                self.visit_finished(unit)
                continue
            self.ensure_setup()
            with LedgerWriter(self.part(unit.name), self.name) as led:
                summary.results[unit.name] = self.process(unit, led)
            summary.add(led)
            summary.done.append(unit.name)
            log.info("%s: unit %d/%d %s: %s", self.name, i + 1, len(urls), unit.name, dict(led.counts))
        summary.missing = self.finish(len(urls))
        summary.seconds = time.perf_counter() - t0
        return summary

    def publish_part(self, unit_name: str, ledger_parquet: bytes) -> None:
        """Publish a ledger part made elsewhere (a Ray actor's `LedgerWriter` bytes), last of the unit."""
        write_atomic(self.part(unit_name), ledger_parquet)

    def finish(self, n_units: int) -> int:
        """After the units: an empty part for a step without units; a quarantine row for each id the
        previous step passed that no part decided. Returns how many ids were missing."""
        if n_units == 0 and not self.ledger_dir.is_dir():
            LedgerWriter(self.ledger_dir / f"{EMPTY_PART}.parquet", self.name).close()
        if self.prev is None:
            return 0
        decided = set(read_ledger(self.ledger_dir)["sample_id"]) if self.ledger_dir.is_dir() else set()
        missing = sorted(self.prev.ids - decided)
        if missing:
            k = len(list(self.ledger_dir.glob(f"{MISSING_PART}*.parquet")))
            path = self.ledger_dir / (f"{MISSING_PART}.parquet" if k == 0 else f"{MISSING_PART}-{k}.parquet")
            with LedgerWriter(path, self.name) as led:
                for sid in missing:
                    led.add(sid, "quarantine", self.missing_reason, detail=self.missing_detail)
            log.warning("%s: %d input ids found in no unit, quarantined as %s", self.name, len(missing),
                        self.missing_reason)
        return len(missing)
