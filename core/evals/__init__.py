"""Evaluation of checkpoints on vision-language benchmarks (CountBench, DocVQA, ChartQA, RealWorldQA,
PixMo-Points): benchmark plugins (`base` interface, `benchmarks` built-ins, `registry`), inference
backends, settings (`config`), checkpoints (`checkpoints`), the evaluation loop (`runner`) and the
results it produces (`results`)."""

from core.evals.backends import GenRequest, VLMBackend, load_backend, register_backend, unregister_backend
from core.evals.base import Benchmark, EvalItem, LoadFailure, Parsed, Scored
from core.evals.checkpoints import CheckpointStore, list_checkpoints
from core.evals.config import EvalConfig, full_eval_config, tiny_eval_config
from core.evals.registry import benchmark_names, get_benchmark, register_benchmark
from core.evals.results import EvalResults, collect_results
from core.evals.runner import evaluate_benchmark, evaluate_checkpoint, evaluate_checkpoints

__all__ = [
    "Benchmark", "CheckpointStore", "EvalConfig", "EvalItem", "EvalResults", "GenRequest", "LoadFailure", "Parsed",
    "Scored", "VLMBackend", "benchmark_names", "collect_results", "evaluate_benchmark", "evaluate_checkpoint",
    "evaluate_checkpoints", "full_eval_config", "get_benchmark", "list_checkpoints", "load_backend",
    "register_backend", "register_benchmark", "tiny_eval_config", "unregister_backend",
]  # fmt: skip
