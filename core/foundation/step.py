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
`publish_part` and `finish` instead of `run` (inside `with step.writing():`).

When a unit counts as finished is one hook, `done(unit)` (default: its ledger part exists); a step whose unit
has another completion record overrides only that (embed: the embeddings file and the ledger part). The
output folder `out` may be a path or an fsspec URL for the ledger (`ledger_url`, `part`); `run` itself
writes local folders. Each published unit is announced to the `add_unit_listener` callbacks (a task that
mirrors its step folder to object storage pushes the unit's files then, so a killed pod loses at most the
unit in flight; tasks/paths.py `step_workdir`).

One writer per step folder, and resume that checks (shared storage: several people and pods write there;
the helpers live in core/foundation/outputs.py and core/foundation/stamp.py and are re-exported here):

- `folder_lock(folder, what)`: an exclusive `fcntl.flock` on `<folder>/.writer.lock` (local paths; released
  by the kernel when the process dies, the file removed on a clean release). The file names its holder
  (host, pid, time, what); a second writer gets `FolderBusy` with that name at once, it never waits.
  `ShardStep.run` / `writing()` hold it on `ledger/<step>/`; ingest holds it on `ledger/ingest/`.
- The stamp `ledger/<step>/_step.json` = `{"step", "config", "code_version"}` (sorted JSON, no time or host,
  so equal runs write equal stamps). `ShardStep` checks it before it counts any part as done: a folder made
  with another config or code refuses with `StepMismatch`, whose message lists each differing field
  (`model_name: 'a' -> 'b'`), unless `step.on_mismatch = "recompute"` (outputs cleared, stamp rewritten).
  The config is derived from the step's `stamp_attrs` attributes (default `cfg` / `config`, a dataclass or
  a mapping); fields in `stamp_ignore` (where and how fast it runs: device, actors, timeouts...) are left
  out. A folder with finished parts but no stamp (made before stamps existed) refuses too.
- The same check for code outside `ShardStep` (a trainer's output folder, rephrase's chunk folder)::

      state = ensure_stamp(folder, "train", asdict(cfg), code_version=code_version(__name__),
                           has_outputs=bool(glob.glob(f"{folder}/checkpoint-*")), on_mismatch="refuse")
      # "new" (stamp written) | "resume" (same stamp) | "recompute" (clear() ran, stamp rewritten)

  `stamp_diff(folder, step, config, code_version)` only compares (the differing field lines, [] when equal
  or unstamped); `code_version(module)` is a hash of the module's project import closure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fsspec

from core.foundation.ledger import LedgerWriter, find_step_dir, ledger_table, step_dir
from core.foundation.outputs import (
    FolderBusy,
    folder_lock,
    fresh_dir,
    local_temp,
    swap_in,
    temp_path,
    write_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from core.foundation.stamp import (
    SCHEDULING_FIELDS,
    STAMP_FILE,
    StepMismatch,
    code_version,
    ensure_stamp,
    make_stamp,
    path_identity,
    plain_config,
    read_stamp,
    stamp_diff,
)

__all__ = [  # the shard-step contract, and the output helpers it is built on (core/foundation/outputs.py, core/foundation/stamp.py)
    "EMPTY_PART", "MISSING_PART", "SCHEDULING_FIELDS", "STAMP_FILE", "FolderBusy", "Passing", "ShardStep",
    "StepMismatch", "StepSummary", "Unit", "code_version", "ensure_stamp", "folder_lock", "fresh_dir",
    "local_temp", "make_stamp", "path_identity", "plain_config", "read_stamp", "shards_of", "stamp_diff",
    "swap_in", "temp_path", "write_atomic", "write_json_atomic", "write_parquet_atomic", "add_unit_listener",
    "on_unit_published", "remove_unit_listener",
]

log = logging.getLogger(__name__)

MISSING_PART = "part-zz-missing"
EMPTY_PART = "part-empty"

# (step, unit name) callbacks run after a unit's ledger part is published; see `on_unit_published`
_UNIT_LISTENERS: list[Callable[[ShardStep, str], None]] = []


def add_unit_listener(callback: Callable[[ShardStep, str], None]) -> None:
    """Call `callback(step, unit_name)` each time a `ShardStep` of this process publishes a unit's ledger part
    (the unit is finished), until `remove_unit_listener`. A task whose step folder is a local mirror of object
    storage pushes the unit's files from there (tasks/paths.py `step_workdir`). A callback that raises fails
    the step (the unit stays finished locally)."""
    _UNIT_LISTENERS.append(callback)


def remove_unit_listener(callback: Callable[[ShardStep, str], None]) -> None:
    """Stop calling `callback` (no error when it is not registered)."""
    with contextlib.suppress(ValueError):
        _UNIT_LISTENERS.remove(callback)


@contextlib.contextmanager
def on_unit_published(callback: Callable[[ShardStep, str], None]) -> Iterator[None]:
    """`add_unit_listener(callback)` for the `with` block."""
    add_unit_listener(callback)
    try:
        yield
    finally:
        remove_unit_listener(callback)


# ---- where the inputs are -------------------------------------------------------------------------
def shards_of(path: str | os.PathLike) -> list[str]:
    """The WDS shard URLs of a run directory (its `shards/`) or of a shard folder, URL or glob.

    The one place that decides "run folder or shards folder": a directory with a `shards/` child is a run."""
    from core.io.wds import list_shards

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
        return cls.from_table(ledger_table(find_step_dir(prev, prev_step), ["sample_id", "decision", "shard"]),
                              prev_step)

    @classmethod
    def from_table(cls, ledger: Any, step: str = "") -> Passing:
        """From a ledger as an Arrow table (`core.foundation.ledger.ledger_table`; no pandas, which any
        `pyarrow.compute` call imports: ~0.2 s for a driver that needs none)."""
        from core.foundation.ledger import PASSING

        by: dict[str, list[str]] = {}
        for sid, decision, shard in zip(*(ledger.column(c).to_pylist() for c in ("sample_id", "decision", "shard"))):
            if decision in PASSING:
                by.setdefault(str(shard or ""), []).append(str(sid))
        return cls(step, by)

    @classmethod
    def from_ledger(cls, ledger: Any, step: str = "") -> Passing:
        """From a ledger DataFrame (`core.foundation.ledger.read_ledger`): the rule of `from_table`."""
        import pyarrow as pa

        cols = ["sample_id", "decision", "shard"]
        return cls.from_table(pa.Table.from_pandas(ledger[cols], preserve_index=False), step)

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
    # what the stamp records as the step's config: these attributes (a dataclass's fields are merged in,
    # other values kept under the attribute's name), less the fields that only say where/how fast it runs
    stamp_attrs: ClassVar[tuple[str, ...]] = ("cfg", "config")
    stamp_ignore: ClassVar[frozenset[str]] = SCHEDULING_FIELDS

    def __init__(self, out: str | os.PathLike, prev: Passing | None = None):
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set the class attribute `name`")
        self.out_url = str(out).rstrip("/")  # the folder as given (a path or an fsspec URL)
        self.out = Path(out)
        self.prev = prev
        self._ready = False
        self.on_mismatch = "refuse"  # or "recompute": a folder stamped with another config is cleared
        self._stamp_state = ""  # "new" | "resume" | "recompute" once checked
        self._writing = 0

    # -- what subclasses write --------------------------------------------------------------------------
    def setup(self) -> None:
        """Load what processing needs (a model...): called once, before the first unfinished unit only."""

    def process(self, unit: Unit, led: LedgerWriter) -> Any:
        """Decide about every input sample of `unit` into `led`; publish the unit's artifacts before returning.
        The returned value is kept in `StepSummary.results[unit.name]`."""
        raise NotImplementedError

    def visit_finished(self, unit: Unit) -> None:
        """Called for a unit skipped because its ledger part exists (steps that aggregate over all units)."""

    def prepare_reduce(self) -> None:
        """Called by a fan-out's driver (core/runs/fanout.py) after `pending`, while its actors start and before
        any unit is announced: load what the reduce (`unit_published`, `finish`) will need, so that the work
        falls where the driver's cores wait for the actors instead of competing with them later. Raising
        here stops the run before any unit is processed. Default: nothing (an in-process `run` never calls
        it: its reduce loads lazily)."""

    def unit_name(self, url: str) -> str:
        from core.io.wds import shard_name

        return shard_name(url)

    def stamp_config(self) -> dict[str, Any]:
        """The config this step's outputs depend on (the stamp's `config`): from `stamp_attrs`, less
        `stamp_ignore`. Override when the outputs depend on something else."""
        out: dict[str, Any] = {}
        for attr in self.stamp_attrs:
            v = getattr(self, attr, None)
            if v is None:
                continue
            v = plain_config(v)
            if isinstance(v, dict) and attr in ("cfg", "config"):
                out.update(v)
            else:
                out[attr] = v
        return {k: v for k, v in out.items() if k not in self.stamp_ignore}

    def clear_outputs(self) -> None:
        """Remove the step's outputs before a recompute (`on_mismatch="recompute"`): its ledger parts.
        Steps that publish other artifacts extend it."""
        fs, root = fsspec.core.url_to_fs(self.ledger_url)
        for f in fs.glob(f"{root}/*.parquet"):
            fs.rm(f)

    # -- the contract -----------------------------------------------------------------------------------
    @property
    def ledger_dir(self) -> Path:
        return step_dir(self.out, self.name)

    @property
    def remote(self) -> bool:
        """Whether the step folder is on an object store (an fsspec URL other than file://)."""
        return "://" in self.out_url and not self.out_url.startswith("file://")

    @property
    def ledger_url(self) -> str:
        """The ledger folder as a path or URL: it holds the parts, the stamp and the writer lock."""
        return f"{self.out_url}/ledger/{self.name}" if self.remote else str(self.ledger_dir)

    def check_stamp(self) -> str:
        """Compare the folder's stamp with this step's config and code before any part counts as done
        (`ensure_stamp`); once per step object. Raises `StepMismatch` listing the differing fields."""
        if not self._stamp_state:
            fs, root = fsspec.core.url_to_fs(self.ledger_url)
            has = bool(fs.glob(f"{root}/*.parquet"))
            self._stamp_state = ensure_stamp(self.ledger_url, self.name, self.stamp_config(),
                                             code_version=code_version(type(self).__module__), has_outputs=has,
                                             # no finished part: nothing would be resumed, so a differing
                                             # stamp just means "start over" (a step's own in-flight artifacts,
                                             # such as rephrase's chunks, are checked by that step)
                                             on_mismatch=self.on_mismatch if has else "recompute",
                                             clear=self.clear_outputs)
        return self._stamp_state

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the step folder's writer lock (`folder_lock` on the ledger folder) and check its stamp;
        `run` does this itself, a driver of `pending`/`publish_part`/`finish` wraps them in it."""
        if self._writing:
            yield
            return
        with folder_lock(self.ledger_url, f"step {self.name}"):
            self._writing += 1
            try:
                self.check_stamp()
                yield
            finally:
                self._writing -= 1

    def part(self, unit_name: str) -> Any:
        """The unit's ledger part: a Path, or a URL string when the step folder is remote."""
        if self.remote:
            return f"{self.ledger_url}/part-{unit_name}.parquet"
        return self.ledger_dir / f"part-{unit_name}.parquet"

    def is_done(self, unit_name: str) -> bool:
        """Whether the unit's ledger part exists."""
        fs, p = fsspec.core.url_to_fs(str(self.part(unit_name)))
        return fs.exists(p)

    def done(self, unit: Unit) -> bool:
        """The completion check: whether `unit` is finished and is skipped (`pending`, `run`). Default: its
        ledger part exists (published last). Override when a unit's completion record is something else."""
        return self.is_done(unit.name)

    def unit_published(self, unit_name: str) -> None:
        """Announce a finished unit to the `add_unit_listener` callbacks (called after its ledger part)."""
        for cb in list(_UNIT_LISTENERS):
            cb(self, unit_name)

    def units(self, urls: Sequence[str]) -> list[Unit]:
        units = [Unit(u, self.unit_name(u)) for u in urls]
        if len({u.name for u in units}) != len(units):
            raise ValueError(f"{self.name}: two inputs share a unit name; their outputs would collide")
        return units

    def pending(self, urls: Sequence[str]) -> tuple[list[Unit], list[Unit]]:
        """(units to process, units already finished); finished counts only in a folder stamped with this
        step's config and code (`check_stamp`)."""
        units = self.units(urls)
        self.check_stamp()
        done = [self.done(u) for u in units]
        return [u for u, d in zip(units, done) if not d], [u for u, d in zip(units, done) if d]

    def read(self, unit: Unit, led: LedgerWriter, **kw: Any) -> Iterator[Any]:
        """The unit's samples (a WDS shard), restricted to the previous step's ids; unreadable records go to
        `led` as quarantines. `kw` go to `core.io.wds.iter_shard` (load_images, verify_images...)."""
        from core.io.wds import iter_shard

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
        """Process every unfinished unit in order, then account for missing ids, holding the folder's writer
        lock (`FolderBusy` when another writer has it). Returns the summary."""
        with self.writing():
            return self._run(urls)

    def _run(self, urls: Sequence[str]) -> StepSummary:
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
            self.unit_published(unit.name)  # after the `with`: the part is published when the writer closes
            summary.add(led)
            summary.done.append(unit.name)
            log.info("%s: unit %d/%d %s: %s", self.name, i + 1, len(urls), unit.name, dict(led.counts))
        summary.missing = self.finish(len(urls))
        summary.seconds = time.perf_counter() - t0
        return summary

    def publish_part(self, unit_name: str, ledger_parquet: bytes) -> None:
        """Publish a ledger part made elsewhere (a Ray actor's `LedgerWriter` bytes), last of the unit."""
        write_atomic(self.part(unit_name), ledger_parquet)
        self.unit_published(unit_name)

    def finish(self, n_units: int) -> int:
        """After the units: an empty part for a step without units; a quarantine row for each id the
        previous step passed that no part decided. Returns how many ids were missing."""
        if n_units == 0 and not any(self.ledger_dir.glob("*.parquet")):  # the folder may hold just the stamp
            LedgerWriter(self.ledger_dir / f"{EMPTY_PART}.parquet", self.name).close()
        if self.prev is None:
            return 0
        decided = (set(ledger_table(self.ledger_dir, ["sample_id"]).column("sample_id").to_pylist())
                   if self.ledger_dir.is_dir() else set())
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

    def process_units(self, urls: Sequence[str]) -> StepSummary:
        """Process the unfinished units among `urls` (one with a ledger part is skipped, so a retried group
        redoes only what it did not publish), each published by itself as in `run`, but without the folder
        lock, the stamp check, `visit_finished` or `finish`: the work of one group of a fan-out
        (core/runs/fanout.py), whose driver holds the lock, checked the stamp and runs `finish` once."""
        t0 = time.perf_counter()
        summary = StepSummary(self.name, n_units=len(urls))
        for unit in self.units(urls):
            if self.is_done(unit.name):
                summary.skipped.append(unit.name)
                continue
            self.ensure_setup()
            with LedgerWriter(self.part(unit.name), self.name) as led:
                summary.results[unit.name] = self.process(unit, led)
            summary.add(led)
            summary.done.append(unit.name)
            log.info("%s: unit %s: %s", self.name, unit.name, dict(led.counts))
        summary.seconds = time.perf_counter() - t0
        return summary
