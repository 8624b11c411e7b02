"""Cheap identities of inputs, for resume checks: a model directory, a list of files, a config diff.

A resumed step must know whether what is on disk was made from the same inputs. Paths are no identity
(a Flyte task downloads its inputs to a fresh folder on every attempt), full content hashes of a
multi-GB model are too slow; `dir_fingerprint` hashes every file's relative name and size plus the
content of the small ones (configs, tokenizer and trainer-state files), which tells apart two models,
two tokenizers and two checkpoints of one run (their `trainer_state.json` differ).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SMALL_FILE_BYTES = 1 << 20  # files up to this size are hashed by content (configs, tokenizers, states)


def dir_fingerprint(path: str | os.PathLike | None) -> str:
    """`sha256:<hex>` of a directory's file names, sizes and small-file contents (of a file: its name, size
    and small content); any other value (a model name, a URL, "") is its own identity, returned unchanged."""
    if path is None:
        return ""
    if not str(path).removeprefix("local-dir:"):  # "" is no directory: Path("") is the working directory
        return str(path)
    p = Path(str(path).removeprefix("local-dir:"))
    if p.is_file():  # a weights file: its name, size and (when small) content
        size = p.stat().st_size
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if size <= SMALL_FILE_BYTES else ""
        return files_fingerprint([(p.name, size, digest)])
    if not p.is_dir():
        return str(path)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(p).as_posix()}\0{size}\0".encode("utf-8", "surrogatepass"))
        if size <= SMALL_FILE_BYTES:
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def files_fingerprint(items: Iterable[tuple[str, int, str]]) -> str:
    """`sha256:<hex>` of (name, size, content digest or "") triples, in the given order."""
    h = hashlib.sha256()
    for name, size, digest in items:
        h.update(f"{name}\0{size}\0{digest}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + h.hexdigest()


def diff_fields(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (recorded, current)} for every field whose value differs (missing on one side counts)."""
    keys = sorted(set(recorded) | set(current))
    return {k: (recorded.get(k), current.get(k)) for k in keys if recorded.get(k) != current.get(k)}


def describe_diff(diff: Mapping[str, tuple[Any, Any]], limit: int = 80) -> str:
    """`field: old -> new; ...` with long values shortened (prompts, fingerprints)."""
    def short(v: Any) -> str:
        s = repr(v)
        return s if len(s) <= limit else s[: limit - 3] + "..."

    return "; ".join(f"{k}: {short(a)} -> {short(b)}" for k, (a, b) in diff.items())
