"""A local copy of a folder named by URL, for code that needs a path (a model or tokenizer folder).

A fan-out over Ray worker pods (core/runs/fanout.py, `pod_workers > 0`) gives its actors URLs, not the driver's
local paths: an actor on another node cannot read the driver's disk. `local_dir(url)` fetches the folder once per
process into `$TMPDIR/mmcurate-fetch/<sha256 of the URL>/` (a finished copy is marked by a `.complete` file, so a
copy cut short is fetched again) and returns that path; a local path is returned as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import fsspec

__all__ = ["is_url", "local_dir"]


def is_url(p: str) -> bool:
    """An fsspec URL other than file://."""
    return "://" in p and not p.startswith("file://")


def local_dir(url: str, cache: str | None = None) -> str:
    """`url` itself when it is a local path (or empty), else a local copy of the folder it names."""
    if not url or not is_url(url):
        return url.removeprefix("file://") if url else url
    root = cache or os.path.join(tempfile.gettempdir(), "mmcurate-fetch")
    dst = os.path.join(root, hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24])
    if os.path.exists(os.path.join(dst, ".complete")):
        return dst
    fs, src = fsspec.core.url_to_fs(url.rstrip("/"))
    part = tempfile.mkdtemp(prefix=".part-", dir=_mkdir(root))
    try:
        names = fs.find(src)
        if not names:
            raise FileNotFoundError(f"{url}: no files under this folder")
        dsts = [os.path.join(part, os.path.relpath(n, src)) for n in names]
        for d in {os.path.dirname(x) for x in dsts}:
            os.makedirs(d, exist_ok=True)
        fs.get(names, dsts)  # one batched call: object stores fetch them concurrently
        open(os.path.join(part, ".complete"), "w").close()
        try:
            os.rename(part, dst)
        except OSError:  # another process of this node finished first: use its copy
            if not os.path.exists(os.path.join(dst, ".complete")):
                raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return dst


def _mkdir(p: str) -> str:
    os.makedirs(p, exist_ok=True)
    return p
