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

One writer per step folder, and resume that checks (shared storage: several people and pods write there):

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
                           has_outputs=any(Path(folder).iterdir()), on_mismatch="refuse", clear=None)
      # "new" (stamp written) | "resume" (same stamp) | "recompute" (clear() ran, stamp rewritten)

  `stamp_diff(folder, step, config, code_version)` only compares (the differing field lines, [] when equal
  or unstamped); `code_version(module)` is a hash of the module's project import closure.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
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


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide outputs from the team


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
    os.chmod(d, 0o777 & ~_umask())
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
        os.rmdir(aside)  # a unique free name; rename(dir, existing empty dir) would also work, not for files
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


# ---- resume that checks: the step stamp -----------------------------------------------------------
STAMP_FILE = "_step.json"
# Config fields that say where and how fast a step runs, not what it outputs: a resume may change them.
SCHEDULING_FIELDS = frozenset({
    "device", "num_actors", "num_gpus", "cpus_per_actor", "decode_workers", "prefetch_batches",
    "actor_start_timeout_s", "max_shard_retries", "cache_dir", "overlap_io", "gpu_memory_utilization",
    "tensor_parallel", "max_parallel_shards", "num_workers",
})
MISMATCH_ACTIONS = ("refuse", "recompute")


class StepMismatch(RuntimeError):
    """A step folder was made with another config or code version than the resuming step's."""

    def __init__(self, folder: str, step: str, fields: list[str]):
        self.folder, self.step, self.fields = folder, step, fields
        super().__init__(
            f"{folder} holds {step!r} outputs made with another config or code; differing fields: "
            f"{'; '.join(fields)}. Use a fresh output folder, the same config, or on_mismatch='recompute' "
            "(clears the folder's outputs)")


def _plain(x: Any) -> Any:
    """JSON-comparable form of a config value (dataclasses and tuples become dicts and lists; local paths
    become what they hold, `path_identity`)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    return _paths_by_content(json.loads(json.dumps(x, sort_keys=True, default=str)))


def _paths_by_content(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _paths_by_content(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_paths_by_content(v) for v in x]
    if isinstance(x, str) and os.sep in x and "://" not in x and os.path.exists(x):
        return path_identity(x)
    return x


def path_identity(path: str, max_entries: int = 10_000) -> str:
    """What a local file or folder holds, not where it is: `<dir N files B bytes sha256:...>` over the
    relative names and sizes of its files (up to `max_entries`). A Flyte task downloads its model or eval
    set to a new path on every attempt; stamping the path would refuse every retry, stamping nothing would
    accept another model."""
    h, n, size = hashlib.sha256(), 0, 0
    if os.path.isfile(path):
        st = os.stat(path)
        h.update(f"{st.st_size}".encode())
        return f"<file {st.st_size} bytes sha256:{h.hexdigest()[:16]}>"
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if n >= max_entries:
                break
            f = os.path.join(root, name)
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, path)}\0{st.st_size}\0".encode())
            n, size = n + 1, size + st.st_size
    return f"<dir {n} files {size} bytes sha256:{h.hexdigest()[:16]}>"


def _diff(old: Any, new: Any, where: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            name = f"{where}.{k}" if where else str(k)
            if k not in old:
                out.append(f"{name}: (absent) -> {_short(new[k])}")
            elif k not in new:
                out.append(f"{name}: {_short(old[k])} -> (absent)")
            else:
                _diff(old[k], new[k], name, out)
    elif old != new:
        out.append(f"{where or 'config'}: {_short(old)} -> {_short(new)}")


def _short(v: Any, n: int = 80) -> str:
    r = json.dumps(v, sort_keys=True)
    return r if len(r) <= n else r[: n - 3] + "..."


def make_stamp(step: str, config: Any, code_version: str = "") -> dict[str, Any]:
    """The stamp of a step folder: step name, config (plain JSON), code version."""
    return {"step": step, "config": _plain(config if config is not None else {}), "code_version": code_version}


def read_stamp(folder: str | os.PathLike) -> dict[str, Any] | None:
    """`<folder>/_step.json` (path or fsspec URL), or None when the folder has no stamp."""
    fs, p = fsspec.core.url_to_fs(f"{str(folder).rstrip('/')}/{STAMP_FILE}")
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return json.loads(f.read())


def stamp_diff(folder: str | os.PathLike, step: str, config: Any, code_version: str = "") -> list[str]:
    """Lines `field: old -> new` for each field where the folder's stamp differs from (step, config,
    code_version); [] when they agree or the folder has no stamp."""
    old = read_stamp(folder)
    if old is None:
        return []
    out: list[str] = []
    _diff(old, make_stamp(step, config, code_version), "", out)
    return [line.removeprefix("config.") for line in out]


def ensure_stamp(folder: str | os.PathLike, step: str, config: Any, *, code_version: str = "",
                 has_outputs: bool = False, on_mismatch: str = "refuse",
                 clear: Callable[[], None] | None = None) -> str:
    """Check the folder's stamp against (step, config, code_version) before resuming into it.

    Returns "new" (no stamp: written now), "resume" (same stamp) or "recompute" (it differed and
    `on_mismatch="recompute"`: `clear()` ran first, then the new stamp was written). A differing stamp with
    `on_mismatch="refuse"` raises `StepMismatch` listing the differing fields; so does a folder without a
    stamp whose caller says it `has_outputs` (made before stamps, or by a writer that did not stamp)."""
    if on_mismatch not in MISMATCH_ACTIONS:
        raise ValueError(f"on_mismatch={on_mismatch!r}; expected one of {MISMATCH_ACTIONS}")
    stamp = make_stamp(step, config, code_version)
    old = read_stamp(folder)
    if old == stamp:
        return "resume"
    if old is None and not has_outputs:
        write_json_atomic(stamp, f"{str(folder).rstrip('/')}/{STAMP_FILE}", indent=1, sort_keys=True)
        return "new"
    fields = ["(no stamp: outputs of an unknown config)"] if old is None else stamp_diff(folder, step, config,
                                                                                       code_version)
    if on_mismatch == "refuse":
        raise StepMismatch(str(folder), step, fields)
    log.warning("%s: %s made with another config (%s): recomputing", folder, step, "; ".join(fields))
    if clear is not None:
        clear()  # before the new stamp: a crash here leaves the old stamp, so the next run clears again
    write_json_atomic(stamp, f"{str(folder).rstrip('/')}/{STAMP_FILE}", indent=1, sort_keys=True)
    return "recompute"


_ROOT = Path(__file__).resolve().parent.parent  # the checkout (or install) holding core/ and tasks/
_PROJECT = ("core", "tasks")


def _module_file(dotted: str) -> Path | None:
    """The source file of a module, found without importing it (importing would load torch & co)."""
    import sys

    if dotted.split(".")[0] in _PROJECT:
        base = _ROOT.joinpath(*dotted.split("."))
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
        return None
    f = getattr(sys.modules.get(dotted), "__file__", None)  # a step defined outside the project (a test)
    return Path(f) if f and f.endswith(".py") else None


@lru_cache(maxsize=None)
def code_version(module: str) -> str:
    """sha256 (16 hex) of the source of `module` and of every project module (`core`, `tasks`) it imports,
    transitively (function-local imports included): the code that can change a step's outputs. "" when the
    source is not available (a zipped install)."""
    h, seen, todo = hashlib.sha256(), set(), [module]
    while todo:
        mod = todo.pop()
        f = None if mod in seen else _module_file(mod)
        if f is None:
            continue
        seen.add(mod)
        src = f.read_bytes()
        h.update(mod.encode() + b"\0" + src + b"\0")
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(src)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import: resolved against this module's package
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            todo += [n for n in names if n.split(".")[0] in _PROJECT and n not in seen]
    return h.hexdigest()[:16] if seen else ""


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
    # what the stamp records as the step's config: these attributes (a dataclass's fields are merged in,
    # other values kept under the attribute's name), less the fields that only say where/how fast it runs
    stamp_attrs: ClassVar[tuple[str, ...]] = ("cfg", "config")
    stamp_ignore: ClassVar[frozenset[str]] = SCHEDULING_FIELDS

    def __init__(self, out: str | os.PathLike, prev: Passing | None = None):
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set the class attribute `name`")
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

    def unit_name(self, url: str) -> str:
        from core.wds import shard_name

        return shard_name(url)

    def stamp_config(self) -> dict[str, Any]:
        """The config this step's outputs depend on (the stamp's `config`): from `stamp_attrs`, less
        `stamp_ignore`. Override when the outputs depend on something else."""
        out: dict[str, Any] = {}
        for attr in self.stamp_attrs:
            v = getattr(self, attr, None)
            if v is None:
                continue
            v = _plain(v)
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
    def ledger_url(self) -> str:
        """The ledger folder as a path or URL: it holds the parts, the stamp and the writer lock."""
        return str(self.ledger_dir)

    def check_stamp(self) -> str:
        """Compare the folder's stamp with this step's config and code before any part counts as done
        (`ensure_stamp`); once per step object. Raises `StepMismatch` listing the differing fields."""
        if not self._stamp_state:
            fs, root = fsspec.core.url_to_fs(self.ledger_url)
            has = bool(fs.glob(f"{root}/*.parquet"))
            self._stamp_state = ensure_stamp(self.ledger_url, self.name, self.stamp_config(),
                                             code_version=code_version(type(self).__module__), has_outputs=has,
                                             on_mismatch=self.on_mismatch, clear=self.clear_outputs)
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
        """(units to process, units already finished); finished counts only in a folder stamped with this
        step's config and code (`check_stamp`)."""
        units = self.units(urls)
        self.check_stamp()
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
        if n_units == 0 and not any(self.ledger_dir.glob("*.parquet")):  # the folder may hold just the stamp
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
