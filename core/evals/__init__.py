"""Evaluation of checkpoints on vision-language benchmarks (CountBench, DocVQA, ChartQA, RealWorldQA,
PixMo-Points): benchmark plugins, inference backends, per-sample records and a capped parallel runner."""

from core.evals.backends import GenRequest, VLMBackend, load_backend, register_backend, unregister_backend
from core.evals.base import (
    Benchmark,
    EvalItem,
    LoadFailure,
    Parsed,
    Scored,
    benchmark_names,
    get_benchmark,
    register_benchmark,
)
from core.evals.runner import (
    CheckpointStore,
    EvalConfig,
    EvalResults,
    collect_results,
    evaluate_benchmark,
    evaluate_checkpoint,
    evaluate_checkpoints,
    full_eval_config,
    list_checkpoints,
    tiny_eval_config,
)

__all__ = [
    "Benchmark", "CheckpointStore", "EvalConfig", "EvalItem", "EvalResults", "GenRequest", "LoadFailure", "Parsed",
    "Scored", "VLMBackend", "benchmark_names", "collect_results", "evaluate_benchmark", "evaluate_checkpoint",
    "evaluate_checkpoints", "full_eval_config", "get_benchmark", "list_checkpoints", "load_backend",
    "register_backend", "register_benchmark", "tiny_eval_config", "unregister_backend",
]  # fmt: skip
