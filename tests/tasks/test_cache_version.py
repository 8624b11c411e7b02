"""Cache versions follow each task module's transitive project imports (tasks/cache.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.cache import ROOT, import_closure, task_version


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _toy_project(root: Path) -> None:
    for pkg in ("core", "core/sub", "core/sub/deep", "tasks"):
        _write(root, f"{pkg}/__init__.py", "")
    _write(root, "core/a.py", "import os\n\ndef f():\n    from core.sub import b  # function-local, as task bodies do\n    return b\n")
    _write(root, "core/sub/b.py", "from .deep.c import VALUE\n")  # relative import, two levels
    _write(root, "core/sub/deep/c.py", "VALUE = 1\n")
    _write(root, "core/sub/model_configs/tiny.json", "{}\n")  # package data beside b.py
    _write(root, "core/unrelated.py", "X = 1\n")
    _write(root, "tasks/t1.py", "from core.a import f\n")
    _write(root, "tasks/t2.py", "import core.unrelated\n")
    _write(root, "requirements/lock.txt", "torch==2.14.1\n")


def test_indirect_edit_changes_only_the_tasks_that_import_it(tmp_path):
    _toy_project(tmp_path)
    rel = {p.relative_to(tmp_path).as_posix() for p in import_closure("tasks.t1", tmp_path)}
    assert {"tasks/t1.py", "core/a.py", "core/sub/b.py", "core/sub/deep/c.py", "core/sub/__init__.py",
            "core/sub/deep/__init__.py", "core/__init__.py", "core/sub/model_configs/tiny.json"} <= rel
    assert "core/unrelated.py" not in rel
    v1, v2 = task_version("tasks.t1", tmp_path), task_version("tasks.t2", tmp_path)
    task_version.cache_clear()
    _write(tmp_path, "core/sub/deep/c.py", "VALUE = 2\n")  # two imports away from t1, none from t2
    assert task_version("tasks.t1", tmp_path) != v1
    assert task_version("tasks.t2", tmp_path) == v2
    task_version.cache_clear()
    _write(tmp_path, "core/sub/model_configs/tiny.json", '{"width": 8}\n')
    v1b = task_version("tasks.t1", tmp_path)
    task_version.cache_clear()
    _write(tmp_path, "requirements/lock.txt", "torch==2.15.0\n")  # a pin change invalidates everything
    assert task_version("tasks.t1", tmp_path) != v1b
    assert task_version("tasks.t2", tmp_path) != v2
    task_version.cache_clear()


def test_real_tasks_see_the_code_they_run():
    # ingest_eval_sets / decontaminate_evals run core/evals loaders: the hand-written lists missed them
    dedup = {p.relative_to(ROOT).as_posix() for p in import_closure("tasks.dedup")}
    assert "core/evals/eval_shards.py" in dedup and "core/steps/dedup/mining.py" in dedup
    assert "core/evals/benchmarks.py" in dedup  # reached only transitively
    embed = {p.relative_to(ROOT).as_posix() for p in import_closure("tasks.embed")}
    assert "core/steps/embed/model_configs/mmcurate-tiny-vit.json" in embed
    assert "core/steps/export.py" not in embed and "core/steps/rephrase/step.py" not in embed


def test_editing_a_real_module_changes_its_tasks_version_only(tmp_path):
    copy = tmp_path / "repo"
    for d in ("core", "tasks", "workflows", "requirements"):
        shutil.copytree(ROOT / d, copy / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    before = {m: task_version(m, copy) for m in ("tasks.dedup", "tasks.export", "tasks.rephrase")}
    task_version.cache_clear()
    target = copy / "core/evals/benchmarks.py"
    target.write_text(target.read_text() + "\n# edited\n")
    after = {m: task_version(m, copy) for m in before}
    task_version.cache_clear()
    assert after["tasks.dedup"] != before["tasks.dedup"]
    assert after["tasks.export"] == before["tasks.export"]
    assert after["tasks.rephrase"] == before["tasks.rephrase"]
