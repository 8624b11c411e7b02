"""Resume that checks: the stamp a step folder carries (`_step.json`: step, config, code version).

A part found on disk counts as done only if the folder was made with the same config and code; otherwise
`ensure_stamp` refuses with `StepMismatch` listing each differing field, or (asked to) clears and recomputes.
`core.foundation.step.ShardStep` applies it to every per-shard step; other code calls `ensure_stamp` itself (see the
`core.foundation.step` docstring). Re-exported by `core.foundation.step`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import fsspec

from core.foundation.outputs import write_json_atomic

log = logging.getLogger(__name__)

# ---- resume that checks: the step stamp -----------------------------------------------------------
STAMP_FILE = "_step.json"
# Config fields that say where and how fast a step runs, not what it outputs: a resume may change them.
SCHEDULING_FIELDS = frozenset({
    "device", "num_actors", "num_gpus", "cpus_per_actor", "decode_workers", "prefetch_batches",
    "actor_start_timeout_s", "max_shard_retries", "cache_dir", "overlap_io", "gpu_memory_utilization",
    "tensor_parallel", "max_parallel_shards", "num_workers", "fanout", "filter_fanout",
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


def plain_config(x: Any) -> Any:
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
    return {"step": step, "config": plain_config(config if config is not None else {}), "code_version": code_version}


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


_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or install) holding core/ and tasks/
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
