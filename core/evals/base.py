"""The benchmark plugin interface.

A benchmark is four things: a loader that reads the benchmark's published files from a local or fsspec
cache directory, a prompt template, an answer parser and a per-sample metric. Register a new one with
`core.evals.registry.register_benchmark(MyBenchmark())`; the runner only talks to this interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question: encoded images, the question fields, the ground truth (JSON-able)."""

    id: str
    images: list[bytes]
    question: str
    target: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadFailure:
    """A benchmark row that could not become an EvalItem (recorded as a failed sample, never dropped)."""

    id: str
    reason: str


@dataclass(frozen=True)
class Parsed:
    """A parsed model answer. `ok` is parsing_success; `value` is JSON-able (None when not ok)."""

    value: Any
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Scored:
    """The per-sample metric: `score` in [0, 1] (what the benchmark averages), `correct` a bool view of it,
    `details` extra JSON-able numbers (e.g. precision/recall for pointing)."""

    score: float
    correct: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reference:
    """A reply scored the reference way (lmms-eval's task code, Molmo's PointingEval for PixMo-Points).

    `extracted` is what the metric compared (the option letter, the normalised count, the pixel points;
    JSON-able), `ok` whether the reference extraction/format check succeeded, `metrics` every per-sample
    metric the reference task reports (lmms-eval's names), `score` the primary one, None where the
    reference evaluator leaves the sample out of its mean."""

    extracted: Any
    ok: bool
    metrics: dict[str, float]
    score: float | None
    correct: bool


class Benchmark:
    """Base class of a benchmark plugin. Subclasses set `name`, `metric_name` (the reference metric),
    `max_new_tokens` and implement `load`, `prompt`, `reference` (default scoring) and `parse`, `score`
    (the lenient scoring, opt-in)."""

    name: str = ""
    metric_name: str = ""
    lenient_metric_name: str = ""
    max_new_tokens: int = 16

    def load(self, root: str) -> Iterator[EvalItem | LoadFailure]:
        """Yield the items under `root` (the benchmark's cache directory, local path or fsspec URL)."""
        raise NotImplementedError

    def prompt(self, item: EvalItem) -> str:
        """The text prompt for `item` (without image placeholders; backends add them)."""
        raise NotImplementedError

    def reference(self, output: str, item: EvalItem) -> Reference:
        """Score a raw model output exactly as the reference implementation does (the default score)."""
        raise NotImplementedError

    def parse(self, output: str, item: EvalItem) -> Parsed:
        """Lenient scoring: parse a raw model output into the answer the lenient metric compares."""
        raise NotImplementedError

    def score(self, parsed: Parsed, item: EvalItem) -> Scored:
        """Score a parsed answer; called for unparsed answers too (they score 0 unless stated)."""
        raise NotImplementedError

    def gold_answer(self, item: EvalItem) -> str | None:
        """The reply a perfect model gives, in the format the prompt asks for: the continuation whose
        teacher-forced NLL is the early-signal metric `answer_nll`. Default: a string or integer target as
        text; None (no answer NLL) for other targets."""
        t = item.target
        if isinstance(t, bool) or not isinstance(t, (str, int)):
            return None
        return str(t)

    def choices(self, item: EvalItem) -> tuple[list[str], int | None] | None:
        """Multiple-choice items: (the option continuations, the gold one's index or None); None for items
        that are not multiple choice. Their likelihoods give `mc_choice` (lmms-eval's `multiple_choice`)."""
        return None
