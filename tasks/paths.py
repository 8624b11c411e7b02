"""Path helpers shared by the thin tasks: the task's working directory, the persistent folder a per-shard step
resumes in, where a FlyteDirectory really lives, and fetching only one step's ledger from a remote step output.

Retries resume (`step_workdir`): a Flyte retry runs the task again in a fresh working directory, so a step that
wrote there would redo every shard. A per-shard step writes instead to `<root>/<step>/<key>/`, `key` =
`resume_key(task, cache_version, **inputs)` (the task's cache version and its inputs, so the same task on
the same inputs, i.e. a retry or a re-run whose upstream was cached, finds the same folder) and `root` =
`$MMCURATE_RESUME_ROOT` (a path, e.g. a shared filesystem, or a URL such as `s3://bucket/mmcurate/steps` on
a cluster), else `$MMCURATE_STATE/steps`, else `~/.cache/mmcurate/steps`. The step base skips the units
whose ledger part is there, and the folder's stamp (`ledger/<step>/_step.json`) still refuses a folder made
with another config or code (core/foundation/stamp.py). A URL root is worked on through a local mirror
(`StepFolder`). See docs/architecture.md, "Retries resume".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from flytekit import current_context
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

log = logging.getLogger(__name__)

RESUME_ROOT_ENV = "MMCURATE_RESUME_ROOT"


def workdir(name: str) -> Path:
    """A fresh folder `name` inside the task's working directory."""
    p = Path(current_context().working_directory) / name
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---- retries resume ---------------------------------------------------------------------------------
def resume_root() -> str:
    """Where per-shard steps keep their resumable folders: `$MMCURATE_RESUME_ROOT` (path or URL), else
    `$MMCURATE_STATE/steps`, else `~/.cache/mmcurate/steps`."""
    root = os.environ.get(RESUME_ROOT_ENV, "").strip()
    if root:
        return root.rstrip("/")
    state = os.environ.get("MMCURATE_STATE", "").strip()
    return str(Path(state) / "steps") if state else str(Path.home() / ".cache" / "mmcurate" / "steps")


def _identity(v: Any) -> Any:
    """What an input contributes to a resume key: a FlyteDirectory/FlyteFile by the URI it was passed as (its
    remote source, else its local path), a dataclass by its fields, containers element-wise, scalars as is."""
    if isinstance(v, (FlyteDirectory, FlyteFile)):
        return {"uri": str(v.remote_source or v.path)}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"dataclass": type(v).__name__,
                "fields": {f.name: _identity(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, dict):
        return {str(k): _identity(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_identity(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def resume_key(task_name: str, cache_version: str, **inputs: Any) -> str:
    """The resume key of one task call: sha256 (24 hex) over the task's name, its cache version (the code it
    runs, tasks/cache.py) and its inputs (configs as sorted JSON of their fields, FlyteDirectory/FlyteFile by
    their remote URI or path, scalars as is). A Flyte retry passes the same inputs, so it gets the same key."""
    doc = {"task": task_name, "cache_version": cache_version, "inputs": _identity(inputs)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def step_url(step: str, key: str) -> str:
    """`<resume root>/<step>/<key>`: the persistent folder (path or URL) of one step call."""
    return f"{resume_root()}/{step}/{key}"


def _is_url(p: str) -> bool:
    return "://" in p and not p.startswith("file://")


class StepFolder:
    """The persistent folder of one step call, as a task writes to it (open it with `step_workdir`).

    `url` is `<root>/<step>/<key>` (what the task returns); `path` is the local folder the step writes: `url`
    itself for a local root, else a mirror in this attempt's working directory, which `pull` fills with what
    the folder already holds (finished ledger parts, artifacts, the stamp) and `push` uploads to: the files
    that are new or changed since the last push, ledger parts (`ledger/*/part-*.parquet`) last, after the
    removal of files the step deleted (a recompute). While the folder is open, every unit a `ShardStep`
    publishes is pushed at once (`core.foundation.step.add_unit_listener`), so a killed pod loses at most the
    unit in flight; `close` pushes the rest (summaries, decks). Files starting with "." (temp files, writer
    locks) never travel."""

    def __init__(self, step: str, key: str):
        self.step, self.key = step, key
        self.url = step_url(step, key)
        self.remote = _is_url(self.url)
        if self.remote:
            base = Path(current_context().working_directory)
            base.mkdir(parents=True, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix=f"mirror-{step}-", dir=base)  # fresh per attempt
        else:
            self.path = self.url.removeprefix("file://")
            os.makedirs(self.path, exist_ok=True)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative name -> (size, mtime_ns) the remote holds
        self._listening = False

    def _local_files(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.startswith("."):
                    continue
                f = os.path.join(root, name)
                st = os.stat(f)
                out[os.path.relpath(f, self.path)] = (st.st_size, st.st_mtime_ns)
        return out

    def pull(self) -> int:
        """Copy what the remote folder holds into the mirror; returns the number of files (0 for a local root)."""
        if not self.remote:
            return 0
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        names = [f for f in fs.find(root) if not os.path.basename(f).startswith(".")]
        dsts = [os.path.join(self.path, os.path.relpath(f, root)) for f in names]
        for d in {os.path.dirname(x) for x in dsts}:
            os.makedirs(d, exist_ok=True)
        if names:
            fs.get(names, dsts)  # one batched call: object stores fetch them concurrently
        self._pushed = self._local_files()
        if names:
            log.info("%s: resuming from %s (%d files)", self.step, self.url, len(names))
        return len(names)

    def push(self, *_: Any) -> int:
        """Upload the mirror's new or changed files (ledger parts last) and remove the ones it no longer has;
        returns the number of files uploaded (0 for a local root). Also the `add_unit_listener` callback."""
        if not self.remote:
            return 0
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        now = self._local_files()
        for rel in sorted(set(self._pushed) - set(now)):  # cleared by a recompute: gone before the new stamp
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{root}/{rel}")
            del self._pushed[rel]
        changed = [rel for rel, sig in now.items() if self._pushed.get(rel) != sig]

        def is_part(rel: str) -> bool:
            parts = Path(rel).parts
            return len(parts) == 3 and parts[0] == "ledger" and parts[2].startswith("part-")

        for rel in sorted(changed, key=lambda r: (is_part(r), r)):  # a unit's ledger part goes last
            fs.put_file(os.path.join(self.path, rel), f"{root}/{rel}")
            self._pushed[rel] = now[rel]
        return len(changed)

    def listen(self) -> None:
        """Push every unit a `ShardStep` of this process publishes, until `close` (URL roots only)."""
        from core.foundation.step import add_unit_listener

        if self.remote and not self._listening:
            add_unit_listener(self.push)
            self._listening = True

    def abandon(self) -> None:
        """Stop pushing units without pushing anything more (what finished is already pushed)."""
        from core.foundation.step import remove_unit_listener

        if self._listening:
            remove_unit_listener(self.push)
            self._listening = False

    def close(self) -> str:
        """Push what is left (summaries, decks), stop listening; returns `url`, what the task returns."""
        self.push()
        self.abandon()
        _OPEN.discard(self)
        return self.url

    def __enter__(self) -> StepFolder:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()
            _OPEN.discard(self)


_OPEN: set[StepFolder] = set()  # folders opened and not closed (a task that failed before `close`)


def step_workdir(step: str, key: str) -> StepFolder:
    """Open the persistent folder of one step call: `sf = step_workdir("perplexity", key)`, run the step in
    `sf.path`, then `return FlyteDirectory(sf.close())` (or use it as a context manager).

    Local root: the step writes into the folder itself and `close` has nothing to do. URL root: the folder
    is pulled into a local mirror first, each unit a `ShardStep` publishes is pushed at once, the rest by
    `close`. A task that fails before `close` pushes nothing more (as after a kill); the next folder opened in
    the process stops the failed one's pushes."""
    for old in list(_OPEN):
        old.abandon()
        _OPEN.discard(old)
    sf = StepFolder(step, key)
    sf.pull()
    sf.listen()
    _OPEN.add(sf)
    log.info("%s: step folder %s%s", step, sf.url, f" (local mirror {sf.path})" if sf.remote else "")
    return sf


def source(d: FlyteDirectory) -> str:
    """The directory's remote URL when it has one (stream from it), else its local path."""
    return d.remote_source or d.path


def local_ledger_root(d: FlyteDirectory, step: str) -> str:
    """A local directory holding `ledger/<step>/` of a step output, downloading only that part."""
    src = source(d)
    if "://" not in src:
        return src
    local = workdir(f"prev_{step}")
    current_context().file_access.get_data(f"{src.rstrip('/')}/ledger/{step}", str(local / "ledger" / step),
                                           is_multipart=True)
    return str(local)


def for_actors(d: FlyteDirectory, fan: Any = None) -> str:
    """Where a step reads a folder input: its URL when the step's fan-out runs actors on other pods
    (`fan.pod_workers > 0`: the driver's local copy is on another node), else a local copy (downloaded)."""
    if fan is not None and getattr(fan, "pod_workers", 0) and d.remote_source:
        return d.remote_source
    d.download()
    return d.path


def check_shared(sf: StepFolder, fan: Any = None) -> None:
    """Refuse, before any work, a fan-out over worker pods into a step folder the pods cannot all write: the
    actors of other nodes write their units into the folder itself, so it must be a path on a filesystem every
    pod mounts (`MMCURATE_RESUME_ROOT=/fsx/...`), not a URL worked on through this pod's local mirror."""
    if fan is not None and getattr(fan, "pod_workers", 0) and fan.workers > 1 and sf.remote:
        raise ValueError(f"{sf.step}: fanout.pod_workers={fan.pod_workers} runs actors on {fan.pods} other pods, "
                         f"which cannot write this pod's local mirror of {sf.url}; set {RESUME_ROOT_ENV} to a path "
                         "on a filesystem all pods mount (e.g. FSx for Lustre), or use pod_workers=0 (one pod)")
