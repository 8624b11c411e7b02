"""Publishing a finished task's outputs to the user's `output_dir` (local path or fsspec URL), and saying
where they are.

Each publishing task (run summary, ablation comparison, mixing report) builds its outputs in a local folder,
then publishes that folder's tree to `output_dir` and, optionally, other local folders beside it
(`output_dir/<name>/`): one `publish` call. A publish replaces what was there: re-running `curate` into the
same `--output_dir` with a stricter config leaves only the new samples where a trainer or a glob looks,
never the previous run's shards mixed with the new ones. `_published.json` in `output_dir` lists the files
a publish wrote, so the next one knows which files it may remove."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping

log = logging.getLogger(__name__)

RECORD = "_published.json"


def publish(src_dir: str, output_dir: str, extra: Mapping[str, str] | None = None) -> str:
    """Publish the tree of the local folder `src_dir` as `output_dir`, and each local folder `extra[name]`
    as `output_dir/<name>/`, replacing what `output_dir` held. Returns `display_root(output_dir)`.

    Local `output_dir`: the new tree is assembled in a fresh sibling folder and swapped in whole
    (`core.foundation.step.fresh_dir` / `swap_in`, under the lock `<parent>/.<name>.writer.lock`). The previous folder
    is removed when it held only files an earlier publish recorded; otherwise (files of someone else) it is
    kept aside as `<parent>/.<name>.old-*` and a warning names it. Object stores (no rename): the files the
    previous publish recorded are deleted, then the new ones uploaded; an object under `output_dir` that no
    publish recorded stops the publish (`FileExistsError`) before anything is written or deleted."""
    import fsspec
    import fsspec.implementations.local

    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    trees = {"": src_dir, **{name.strip("/"): local for name, local in (extra or {}).items()}}
    files = sorted(f"{prefix}/{rel}" if prefix else rel for prefix, local in trees.items() for rel in _files(local))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        _publish_local(trees, files, root)
    else:
        _publish_remote(fs, trees, files, root)
    log.info("published %s%s to %s", src_dir, "".join(f" + {n}/" for n in extra or {}), output_dir)
    return display_root(output_dir)


def _files(local: str) -> list[str]:
    """Relative paths of the files under a local folder, sorted."""
    base = os.path.abspath(local)
    return sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs)


def _publish_local(trees: Mapping[str, str], files: list[str], root: str) -> None:
    from core.foundation.outputs import folder_lock, fresh_dir, swap_in, write_json_atomic

    final = os.path.abspath(root)
    staging = fresh_dir(final, "publishing")
    try:
        for prefix, local in trees.items():
            shutil.copytree(local, os.path.join(staging, prefix) if prefix else staging, dirs_exist_ok=True)
        write_json_atomic({"files": files}, os.path.join(staging, RECORD), indent=1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    parent, name = os.path.split(final)
    with folder_lock(parent, f"publish to {final}", lock_name=f".{name}.writer.lock"):
        old = swap_in(staging, final)
    if old is None:
        return
    foreign = sorted(set(_files(old)) - set(_recorded_local(old)) - {RECORD})
    if foreign:
        log.warning("publish: %s held %d file(s) no earlier publish wrote (e.g. %s); they were moved to %s",
                    final, len(foreign), foreign[:3], old)
    else:
        shutil.rmtree(old, ignore_errors=True)


def _recorded_local(folder: str) -> list[str]:
    try:
        with open(os.path.join(folder, RECORD), encoding="utf-8") as f:
            return list(json.load(f)["files"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return []


def _publish_remote(fs, trees: Mapping[str, str], files: list[str], root: str) -> None:
    from core.foundation.outputs import write_json_atomic

    record = f"{root}/{RECORD}"
    before = {p[len(root) + 1:] for p in fs.find(root)} if fs.exists(root) else set()
    recorded: set[str] = set()
    if RECORD in before:
        with fs.open(record, "rb") as f:
            recorded = set(json.loads(f.read())["files"])
    foreign = sorted(before - recorded - {RECORD})
    if foreign:
        raise FileExistsError(f"{root} holds {len(foreign)} file(s) no earlier publish recorded (e.g. {foreign[:3]}); "
                              "publishing over them would mix two runs: choose an empty output_dir or remove them")
    if RECORD in before:
        fs.rm(record)  # first: a folder cleared halfway is then unrecorded, and the next publish refuses it
    stale = sorted(recorded & before)
    if stale:
        fs.rm([f"{root}/{p}" for p in stale])
    fs.makedirs(root, exist_ok=True)
    for prefix, local in trees.items():
        fs.put(local.rstrip("/") + "/", f"{root}/{prefix}/" if prefix else root + "/", recursive=True)
    write_json_atomic({"files": files}, f"{fs.unstrip_protocol(root)}/{RECORD}", indent=1)


def display_root(output_dir: str) -> str:
    """`output_dir` as a user should read it at the end of a run: local paths absolute, URLs unchanged."""
    if "://" in output_dir and not output_dir.startswith("file://"):
        return output_dir.rstrip("/")
    return os.path.abspath(output_dir.removeprefix("file://")).rstrip("/")
