"""Perplexity step over WDS shards: per input shard a scores parquet and a ledger part; resumable.

Layout under the step's output directory `out`::

    out/perplexity/scores-<shard>.parquet   sample_id, shard, nll, ppl, n_scored, n_tokens, truncated, reason,
                                            preview, turn_nll, turn_tokens (per assistant turn)
    out/ledger/perplexity/part-<shard>.parquet
        keep (score = ppl) | quarantine ppl_no_scored_tokens[:truncated] | quarantine ppl_template_mismatch
        | reader quarantines (corrupt records met while streaming) | missing_from_shard (part-zz-missing)
    out/perplexity/summary.json             counts, throughput, padding waste of the last run

A shard whose ledger part exists is skipped on re-run (the part is published last, atomically).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.ledger import LedgerWriter, read_ledger, step_dir
from core.log import progress
from core.perplexity.config import PerplexityConfig
from core.perplexity.scorer import BatchStats, PerplexityScorer, SampleScore
from core.perplexity.vlm import HFVLMScorer, VLMScorer
from core.sample import Sample

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

    `bar`: an optional progress bar (core.log.progress) advanced by the samples of each scored chunk.
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
    path = scores_dir(out) / f"scores-{shard}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA) if rows else SCORES_SCHEMA.empty_table()
    pq.write_table(table, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return scores


def score_shards(
    shards: Sequence[str],
    out: str | os.PathLike,
    config: PerplexityConfig,
    *,
    include_ids: set[str] | None = None,
    scorer: PerplexityScorer | VLMScorer | None = None,
    read_shard: Callable[..., Iterable[Sample]] | None = None,
) -> dict[str, Any]:
    """Score every sample of `shards` (restricted to `include_ids`, the previous step's passing ids).

    Skips shards whose ledger part already exists (resume). The model is loaded once, lazily, only when
    a shard needs scoring (`HFVLMScorer` in vlm mode unless another `VLMScorer` is given). `read_shard(url, quarantine=, include_ids=, load_images=, verify_images=)`
    defaults to `core.wds.iter_shard`. Returns the summary (also written to `perplexity/summary.json`).
    """
    from core.wds import iter_shard, shard_name

    read_shard = read_shard or iter_shard
    t0 = time.time()
    stats = BatchStats()
    done, skipped = 0, 0
    bar = progress(desc="perplexity", total=len(include_ids) if include_ids is not None else None, unit="sample")
    for i, url in enumerate(shards):
        name = shard_name(url)
        part = step_dir(out, STEP) / f"part-{name}.parquet"
        if part.exists():
            skipped += 1
            continue
        if scorer is None:
            from core.perplexity.reference import NO_MODEL

            if os.path.exists(os.path.join(str(config.model), NO_MODEL)):
                raise ValueError(f"the reference LM at {config.model} was trained on no samples (its reference set "
                                 "is empty or entirely quarantined): give a reference_source with usable samples")
            scorer = HFVLMScorer(config) if config.mode == "vlm" else PerplexityScorer(config)
        with LedgerWriter(part, STEP) as led:
            samples = read_shard(url, quarantine=led, include_ids=include_ids, load_images=config.mode == "vlm",
                                 verify_images=False)
            got = score_samples_to_part(samples, name, out, scorer, led, bar=bar)  # an empty part is still published
        done += 1
        log.info("perplexity: shard %d/%d %s scored %d samples", i + 1, len(shards), name, len(got))
    bar.close()
    stats = getattr(scorer, "stats", None) or stats
    if not shards and not step_dir(out, STEP).exists():  # a degenerate run: the step still writes its ledger
        LedgerWriter(step_dir(out, STEP) / "part-empty.parquet", STEP).close()
    if include_ids is not None:
        _ledger_missing(out, include_ids)
    summary = summarize(out) | {"shards_scored": done, "shards_skipped": skipped, "seconds": round(time.time() - t0, 2),
                                "batching": stats.as_dict(), "mode": config.mode, "model": config.model}
    (scores_dir(out) / "summary.json").parent.mkdir(parents=True, exist_ok=True)
    (scores_dir(out) / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    return summary


def _ledger_missing(out: str | os.PathLike, include_ids: set[str]) -> None:
    """Inputs never met in any shard get a quarantine row (`missing_from_shard`), so none vanish."""
    sd = step_dir(out, STEP)
    decided = set(read_ledger(sd)["sample_id"]) if sd.exists() else set()
    missing = sorted(set(include_ids) - decided)
    if missing:
        with LedgerWriter(sd / f"part-zz-missing-{len(list(sd.glob('part-zz-missing-*')))}.parquet", STEP) as led:
            for sid in missing:
                led.add(sid, "quarantine", "missing_from_shard", detail="input id not found in any shard")


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
