"""Perplexity step over WDS shards: per input shard a scores parquet and a ledger part; resumable.

Layout under the step's output directory `out`::

    out/perplexity/scores-<shard>.parquet   sample_id, shard, nll, ppl, n_scored, n_tokens, truncated, reason,
                                            preview, turn_nll, turn_tokens (per assistant turn)
    out/ledger/perplexity/part-<shard>.parquet
        keep (score = ppl) | quarantine ppl_no_scored_tokens[:truncated] | quarantine ppl_template_mismatch
        | reader quarantines (corrupt records met while streaming) | missing_from_shard (part-zz-missing)
    out/perplexity/summary.json             counts, throughput, padding waste of the last run

`PerplexityStep` is a `core.foundation.step.ShardStep`: a shard whose ledger part exists is skipped on re-run (the
part is published last, atomically), ids of `prev` in no shard are quarantined `missing_from_shard`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.foundation.ledger import LedgerWriter, read_ledger, step_dir
from core.foundation.log import progress
from core.foundation.sample import Sample
from core.foundation.step import Passing, ShardStep, Unit, write_json_atomic, write_parquet_atomic
from core.steps.perplexity.config import PerplexityConfig
from core.steps.perplexity.scorer import BatchStats, PerplexityScorer, SampleScore
from core.steps.perplexity.vlm import HFVLMScorer, VLMScorer

log = logging.getLogger(__name__)

STEP = "perplexity"
PREVIEW_CHARS = 600
SCORES_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("shard", pa.string()), ("nll", pa.float64()), ("ppl", pa.float64()),
    ("n_scored", pa.int64()), ("n_tokens", pa.int64()), ("truncated", pa.bool_()), ("reason", pa.string()),
    ("preview", pa.string()), ("turn_nll", pa.list_(pa.float64())), ("turn_tokens", pa.list_(pa.int64())),
])


def scores_dir(out: str | os.PathLike) -> Path:
    return Path(out) / STEP


def preview_text(sample: Sample, chars: int = PREVIEW_CHARS) -> str:
    """The conversation as `role: text` lines, cut to `chars` (for decks and slice inspection)."""
    text = "\n".join(f"{t.role}: {t.value}" for t in sample.conversations)
    return text if len(text) <= chars else text[: chars - 1] + "…"


def score_samples_to_part(
    samples: Iterable[Sample],
    shard: str,
    out: str | os.PathLike,
    scorer: PerplexityScorer | VLMScorer,
    led: LedgerWriter,
    chunk_samples: int = 4096,
    bar: Any = None,
) -> list[SampleScore]:
    """Score a stream of samples (one shard) in chunks; add their ledger rows; write the scores parquet.

    `bar`: an optional progress bar (core.foundation.log.progress) advanced by the samples of each scored chunk.
    """
    scores: list[SampleScore] = []
    previews: dict[str, str] = {}
    buf: list[Sample] = []

    def flush() -> None:
        if not buf:
            return
        if isinstance(scorer, PerplexityScorer):
            got, bad = scorer.score_samples(buf)
        else:
            got, bad = scorer.score(buf), []
        for sid, err in bad:
            led.add(sid, "quarantine", err.reason, shard=shard, detail=err.detail)
        for s in got:
            if s.n_scored > 0:
                led.add(s.sample_id, "keep", score=s.ppl, shard=shard, nll=s.nll, n_scored=s.n_scored,
                        truncated=s.truncated)
            else:
                led.add(s.sample_id, "quarantine", s.reason or "ppl_no_scored_tokens", shard=shard,
                        truncated=s.truncated)
        scores.extend(got)
        if bar is not None:
            bar.update(len(buf))
        buf.clear()

    for s in samples:
        buf.append(s)
        previews[s.id] = preview_text(s)
        if len(buf) >= chunk_samples:
            flush()
    flush()
    rows = [s.as_dict() | {"shard": shard, "preview": previews.get(s.sample_id, "")} for s in scores]
    table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA) if rows else SCORES_SCHEMA.empty_table()
    write_parquet_atomic(table, scores_dir(out) / f"scores-{shard}.parquet")
    return scores


class PerplexityStep(ShardStep):
    """Per shard: score every input sample, publish `perplexity/scores-<shard>.parquet`, then the ledger part.

    The model is loaded once, lazily, only when a shard needs scoring (`HFVLMScorer` in vlm mode,
    `PerplexityScorer` otherwise, unless a `scorer` is given)."""

    name = STEP

    def __init__(self, out: str | os.PathLike, config: PerplexityConfig, prev: Passing | None = None,
                 scorer: PerplexityScorer | VLMScorer | None = None):
        super().__init__(out, prev)
        self.config, self.scorer, self.bar = config, scorer, None

    def setup(self) -> None:
        if self.scorer is None:
            from core.foundation.configs import override
            from core.io.fetch import local_dir
            from core.steps.perplexity.reference import NO_MODEL

            # an actor on a worker pod gets the model's URL (the driver's path is on another node)
            cfg = override(self.config, model=local_dir(str(self.config.model)))
            if os.path.exists(os.path.join(str(cfg.model), NO_MODEL)):
                raise ValueError(f"the reference LM at {self.config.model} was trained on no samples (its reference "
                                 "set is empty or entirely quarantined): give a reference_source with usable samples")
            self.scorer = HFVLMScorer(cfg) if cfg.mode == "vlm" else PerplexityScorer(cfg)
        self.bar = progress(desc=STEP, total=len(self.prev) if self.prev is not None else None, unit="sample")

    def process(self, unit: Unit, led: LedgerWriter) -> int:
        samples = self.read(unit, led, load_images=self.config.mode == "vlm")
        return len(score_samples_to_part(samples, unit.name, self.out, self.scorer, led, bar=self.bar))


def score_shards(
    shards: Sequence[str],
    out: str | os.PathLike,
    config: PerplexityConfig,
    *,
    prev: Passing | None = None,
    scorer: PerplexityScorer | VLMScorer | None = None,
) -> dict[str, Any]:
    """Run `PerplexityStep` over `shards` (restricted to `prev`, the previous step's passing ids; None = all).

    Returns the summary (also written to `perplexity/summary.json`): counts and quantiles over everything
    scored in `out`, shards scored/skipped, seconds, batching stats, mode and model."""
    if scorer is not None or config.fanout.workers == 1:  # in this process (a given scorer is not shipped)
        step = PerplexityStep(out, config, prev, scorer)
        run = step.run(shards)
        if step.bar is not None:
            step.bar.close()
        stats = getattr(step.scorer, "stats", None) or BatchStats()
    else:  # over a pool of Ray actors, one model each (core/runs/fanout.py)
        from core.runs.fanout import StepSpec, run_fanout

        run = run_fanout(StepSpec(PerplexityStep, (out, config, prev)), shards, config.fanout)
        stats = BatchStats()  # per-actor batching stats stay in the actors' logs
    summary = summarize(out) | {"shards_scored": len(run.done), "shards_skipped": len(run.skipped),
                                "seconds": round(run.seconds, 2), "batching": stats.as_dict(), "mode": config.mode,
                                "model": config.model}
    write_json_atomic(summary, scores_dir(out) / "summary.json", indent=1, default=_json_default)
    return summary


def read_scores(out: str | os.PathLike | Sequence[str | os.PathLike]) -> Any:
    """All scores parquets of one or several step output dirs as a DataFrame."""
    import pandas as pd

    dirs = [out] if isinstance(out, (str, os.PathLike)) else list(out)
    files = sorted(f for d in dirs for f in scores_dir(d).glob("scores-*.parquet"))
    if not files:
        return SCORES_SCHEMA.empty_table().to_pandas()
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def summarize(out: str | os.PathLike) -> dict[str, Any]:
    """Counts and perplexity quantiles over everything scored in `out` (resumed shards included)."""
    import numpy as np

    df = read_scores(out)
    led = read_ledger(step_dir(out, STEP)) if step_dir(out, STEP).exists() else None
    ok = df[df.n_scored > 0]
    q = {f"ppl_p{p}": float(np.percentile(ok.ppl, p)) for p in (1, 10, 50, 90, 99)} if len(ok) else {}
    reasons = {} if led is None else led[led.decision == "quarantine"].groupby("reason").size().to_dict()
    return {
        "n_samples": int(len(df)),
        "n_kept": int(len(ok)),
        "n_quarantined": int(0 if led is None else (led.decision == "quarantine").sum()),
        "n_truncated": int(df.truncated.sum()),
        "scored_tokens": int(df.n_scored.sum()),
        "mean_nll": float(ok.nll.mean()) if len(ok) else math.nan,
        "reasons": {str(k): int(v) for k, v in reasons.items()},
        **q,
    }


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)
