"""Path helpers shared by the thin tasks: the task's working directory, where a FlyteDirectory really
lives, and fetching only one step's ledger from a remote step output."""

from __future__ import annotations

from pathlib import Path

from flytekit import current_context
from flytekit.types.directory import FlyteDirectory


def workdir(name: str) -> Path:
    """A fresh folder `name` inside the task's working directory."""
    p = Path(current_context().working_directory) / name
    p.mkdir(parents=True, exist_ok=True)
    return p


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
