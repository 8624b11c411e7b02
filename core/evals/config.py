"""Evaluation settings (`EvalConfig`) and its presets."""

from __future__ import annotations

from dataclasses import dataclass

from core.foundation.configs import check_ranges

SCORINGS = ("exact", "lenient")


@dataclass
class EvalConfig:
    """Evaluation settings.

    cache_dir: root of the benchmark caches, `<cache_dir>/<benchmark>/...` (local path or fsspec URL).
    benchmarks: benchmark names (see `core.evals.registry.benchmark_names()`).
    backend: "auto" | "mini_llava" | "transformers" | "vllm" | a registered kind.
    device: "cpu" | "cuda" | "auto".
    batch_size: requests per `generate` call.
    max_samples: per benchmark cap (0 = all), for smoke runs.
    concurrency: checkpoints evaluated (and held on local disk) at once.
    local_dir: where checkpoints are downloaded ("" = the system temp dir).
    scoring: "exact" (reference scoring only) | "lenient" (also the lenient parsers' score, beside it).
    """

    cache_dir: str
    benchmarks: list[str]
    backend: str = "auto"
    device: str = "auto"
    batch_size: int = 8
    max_samples: int = 0
    concurrency: int = 2
    local_dir: str = ""
    scoring: str = "exact"

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        check_ranges(self, {"batch_size": (1, None), "max_samples": (0, None), "concurrency": (1, None)})


def tiny_eval_config(cache_dir: str) -> EvalConfig:
    """Demo/test preset: all five benchmarks on the fixtures, CPU, cap 2."""
    return EvalConfig(cache_dir, ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"],
                      device="cpu", batch_size=4, concurrency=2)  # fmt: skip


def full_eval_config(cache_dir: str) -> EvalConfig:
    """Production preset: all five benchmarks, vLLM on GPU, cap 2 (one checkpoint per GPU worker)."""
    return EvalConfig(cache_dir, ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"],
                      backend="vllm", device="cuda", batch_size=64, concurrency=2)  # fmt: skip
