"""Cache versions tied to code: a task's cache_version hashes every project source file the task's module can
run, found by following its imports (function-local ones included, since heavy imports live inside task
bodies), plus the package data beside those files and the pinned dependencies. A change anywhere in that
closure invalidates the cache; a change elsewhere leaves it alone. (Flyte already keys the cache on the
task's inputs, i.e. on the config and the source fingerprint.)"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("core", "tasks", "workflows")
# Files that pin the third-party code a task runs: a pin change must invalidate cached outputs too.
PIN_FILES = ("pyproject.toml", "requirements/lock.txt")
DATA_SUFFIXES = (".json", ".jinja", ".txt")


def _module_file(root: Path, dotted: str) -> Path | None:
    """The file of a project module `a.b.c` (module or package), or None when it is not in the project."""
    if dotted.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported_modules(root: Path, path: Path) -> set[str]:
    """Dotted names of everything `path` imports anywhere in its body (top level or inside functions)."""
    rel = path.relative_to(root).with_suffix("")
    pkg_parts = list(rel.parts[:-1])  # the package a relative import starts from (also for __init__.py)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            # `from core.x import y` may name a submodule y
            names.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    # importing a.b.c runs a/__init__.py and a/b/__init__.py too
    for n in list(names):
        parts = n.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return names


def _package_data(directory: Path) -> list[Path]:
    """Data files shipped beside a module (e.g. core/steps/embed/model_configs/*.json); sub-packages are skipped:
    their data counts only when they are imported themselves."""
    out, todo = [], [directory]
    while todo:
        d = todo.pop()
        for f in d.iterdir():
            if f.is_dir() and not (f / "__init__.py").exists() and f.name != "__pycache__":
                todo.append(f)
            elif f.is_file() and f.suffix in DATA_SUFFIXES:
                out.append(f)
    return out


def import_closure(module: str, root: Path = ROOT) -> list[Path]:
    """Every project file the module `module` (dotted) can execute, following imports transitively, plus
    the package data beside them; sorted paths."""
    start = _module_file(root, module)
    if start is None:
        raise ValueError(f"{module!r} is not a module of this project (packages {PROJECT_PACKAGES})")
    seen: set[Path] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in _imported_modules(root, f):
            g = _module_file(root, name)
            if g is not None and g not in seen:
                todo.append(g)
    data = {d for f in seen for d in _package_data(f.parent)}
    return sorted(seen | data)


@lru_cache(maxsize=None)
def task_version(module: str, root: Path = ROOT) -> str:
    """cache_version for the tasks of `module` (pass `__name__`): sha256 of its import closure and the pins."""
    h = hashlib.sha256()
    for f in import_closure(module, root):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    for rel in PIN_FILES:
        p = root / rel
        if p.is_file():
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
