"""Publishing a finished task's outputs to the user's `output_dir` (local path or fsspec URL), and saying
where they are.

Each publishing task (run summary, ablation comparison, mixing report) builds its outputs in a local folder,
then copies that folder's tree to `output_dir` and, optionally, other local folders beside it
(`output_dir/<name>/`): one `publish` call."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)


def publish(src_dir: str, output_dir: str, extra: Mapping[str, str] | None = None) -> str:
    """Copy the tree of the local folder `src_dir` into `output_dir` (created if needed), and each local
    folder `extra[name]` into `output_dir/<name>/`. Existing files of the same name are overwritten; other
    files already in `output_dir` are left alone. Returns `display_root(output_dir)`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    fs.put(src_dir.rstrip("/") + "/", root + "/", recursive=True)
    for name, local in (extra or {}).items():
        fs.put(local.rstrip("/") + "/", f"{root}/{name.strip('/')}/", recursive=True)
    log.info("published %s%s to %s", src_dir, "".join(f" + {n}/" for n in extra or {}), output_dir)
    return display_root(output_dir)


def display_root(output_dir: str) -> str:
    """`output_dir` as a user should read it at the end of a run: local paths absolute, URLs unchanged."""
    if "://" in output_dir and not output_dir.startswith("file://"):
        return output_dir.rstrip("/")
    return os.path.abspath(output_dir.removeprefix("file://")).rstrip("/")
