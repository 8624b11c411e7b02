"""The benchmark registry: name -> `Benchmark` plugin, the five built-ins registered on import.

Kept apart from `core.evals.base` (the interface) and `core.evals.benchmarks` (the built-ins) so that the
imports run one way: base <- benchmarks <- registry."""

from __future__ import annotations

from core.evals.base import Benchmark
from core.evals.benchmarks import builtin_benchmarks

_REGISTRY: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Add (or replace) a benchmark under `benchmark.name`."""
    if not benchmark.name:
        raise ValueError("benchmark has no name")
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name` (KeyError lists the known ones)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def benchmark_names() -> list[str]:
    """Names of all registered benchmarks."""
    return sorted(_REGISTRY)


for _b in builtin_benchmarks():
    register_benchmark(_b)
