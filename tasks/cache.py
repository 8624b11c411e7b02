"""Cache versions tied to code: a task's cache_version is a hash of the source files it runs, so a
code change invalidates its cache while a re-run with unchanged code and inputs is a cache hit.
(Flyte already keys the cache on the task's inputs, i.e. on the config.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_version(*paths: str) -> str:
    """Short sha256 of the given files/directories (relative to the repo root; *.py and *.json, sorted)."""
    h = hashlib.sha256()
    for rel in paths:
        p = ROOT / rel
        files = sorted(f for f in p.rglob("*") if f.suffix in (".py", ".json")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# Shared foundations every stage depends on.
CORE_IO = ("core/sample.py", "core/ledger.py", "core/wds.py", "core/images.py", "tasks/paths.py")
