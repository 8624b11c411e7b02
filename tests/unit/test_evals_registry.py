"""The evals modules import one way (base <- benchmarks <- registry; config/checkpoints/results <- runner),
the registry holds the built-ins and new plugins, and a lost worker's stand-in output is failed rows."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd

from core.evals.base import Benchmark
from core.evals.registry import benchmark_names, get_benchmark, register_benchmark
from core.evals.results import RECORD_COLUMNS, SUMMARY_COLUMNS, collect_worker_outputs, lost_worker_dir

EVALS = Path(__file__).resolve().parents[2] / "core" / "evals"


def _imports(name: str) -> set[str]:
    """Every core.evals module `core/evals/<name>.py` imports, anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse((EVALS / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("core.evals"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("core.evals"))
    return out


def test_imports_run_one_way():
    assert _imports("base") == set()
    assert "core.evals.registry" not in _imports("benchmarks")
    assert "core.evals.registry" in _imports("runner")
    for leaf in ("config", "checkpoints", "results"):  # the runner's parts never import the runner back
        assert "core.evals.runner" not in _imports(leaf)
    assert "core.evals.runner" not in _imports("registry")


def test_registry_holds_builtins_and_new_plugins():
    assert benchmark_names() == ["chartqa", "countbench", "docvqa", "pixmo_points", "realworldqa"]

    class Tiny(Benchmark):
        name, metric_name = "tiny_registry_test", "acc"

    try:
        register_benchmark(Tiny())
        assert get_benchmark("tiny_registry_test").metric_name == "acc"
        assert "tiny_registry_test" in benchmark_names()
    finally:
        from core.evals import registry

        registry._REGISTRY.pop("tiny_registry_test", None)
    try:
        get_benchmark("nope")
    except KeyError as e:
        assert "countbench" in str(e)
    else:
        raise AssertionError("unknown benchmark must raise KeyError")


def test_lost_worker_becomes_failed_rows(tmp_path):
    d = lost_worker_dir("/runs/v1/checkpoints/epoch-0002", "countbench,docvqa", str(tmp_path / "lost"))
    rec = pd.read_parquet(Path(d) / "records.parquet")
    summ = pd.read_parquet(Path(d) / "summary.parquet")
    assert list(rec.columns) == RECORD_COLUMNS and rec.empty
    assert list(summ.columns) == SUMMARY_COLUMNS
    assert summ[["benchmark", "metric", "status", "error", "variant", "epoch"]].values.tolist() == [
        ["countbench", "acc", "failed", "worker_lost", "v1", 2.0],
        ["docvqa", "anls", "failed", "worker_lost", "v1", 2.0],
    ]
    res = collect_worker_outputs([None], ["/runs/v1/checkpoints/epoch-0002"], ["countbench"], str(tmp_path / "out"),
                                 str(tmp_path / "lost2"))
    assert res.failed_checkpoints == ["/runs/v1/checkpoints/epoch-0002"]
    assert (tmp_path / "out" / "results.csv").exists() and (tmp_path / "lost2" / "0" / "summary.parquet").exists()
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temp files
