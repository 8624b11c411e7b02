"""Filter or slice samples by perplexity: a kept percentile range, or N equal-size ablation slices.

Inputs are the ids the perplexity step kept (its ledger, score = ppl). Outputs, under `out`:

    range mode:   ledger/ppl_filter/part-all.parquet   keep | drop ppl_above_p90 | drop ppl_below_p10
                  ppl_filter/kept_ids.json
    slices mode:  ledger/ppl_filter/part-all.parquet   keep (extra: slice)
                  ppl_filter/slices.parquet            sample_id, shard, ppl (ranking value), raw_ppl, rank, slice
                  ppl_filter/slice-00.json ...         sorted id lists, slice 00 = lowest perplexity
                  ppl_filter/slices.json               manifest: n, ppl_min, ppl_max, file per slice

Slices have equal sizes (ranks split evenly; ties broken by sample id), so each ablation trains on the
same number of samples.

Ranking value: by default not the raw perplexity but a shrunk one, exp((n * nll + k * prior) / (n + k)),
with n the sample's scored tokens, prior the corpus mean token NLL and k = `shrink_tokens`. A one-token
answer's mean NLL is one noisy draw; shrinkage pulls it toward the corpus mean, so short factual answers
("1", "Increase") stop crowding the worst decile while long garbled answers stay there (on the demo,
held-out tiny LM, assistant_only: recall of planted garbled/unrelated in the worst decile 0.13 -> ~0.8).
`shrink_tokens=0` ranks by raw perplexity. The ledger's score is the ranking value; extra holds raw ppl.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.foundation.configs import ConfigJSON, check_ranges, register_preset
from core.foundation.ledger import LedgerWriter, find_step_dir, passing_ids, read_ledger, step_dir

STEP = "ppl_filter"
SOURCE_STEP = "perplexity"


@dataclass
class SliceConfig(ConfigJSON):
    """What to do with the scored samples.

    :param mode: `range` (keep percentiles [low_pct, high_pct] of perplexity, drop the rest) or `slices`
        (keep all, emit `n_slices` equal-size id lists sorted by perplexity).
    :param low_pct: Lower kept percentile in range mode (0 keeps the lowest perplexities).
    :param high_pct: Upper kept percentile in range mode (90 drops the top 10% as `ppl_above_p90`).
    :param n_slices: Number of slices in slices mode (10 = deciles).
    :param shrink_tokens: Pseudo-tokens of corpus-mean NLL added to each sample before ranking (0 = raw ppl).
    """

    mode: str = "range"
    low_pct: float = 0.0
    high_pct: float = 90.0
    n_slices: int = 10
    shrink_tokens: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in ("range", "slices"):
            raise ValueError(f"mode {self.mode!r} not in (range, slices)")
        check_ranges(self, {"low_pct": (0, 100, {"hi_open": True}), "high_pct": (0, 100, {"lo_open": True}),
                            "n_slices": (1, None), "shrink_tokens": (0, None)})
        if not self.low_pct < self.high_pct:
            raise ValueError(f"low_pct={self.low_pct} must be below high_pct={self.high_pct}")


@register_preset(SliceConfig, "p90", default=True)
def p90_slice_config() -> SliceConfig:
    """Range mode: drop the samples above the 90th perplexity percentile (`ppl_above_p90`)."""
    return SliceConfig(mode="range", low_pct=0.0, high_pct=90.0)


@register_preset(SliceConfig, "deciles")
def decile_slice_config() -> SliceConfig:
    """Slices mode: ten equal-size id lists sorted by perplexity (training runs on slices)."""
    return SliceConfig(mode="slices", n_slices=10)


def ranking_values(nll: np.ndarray, n_scored: np.ndarray, shrink_tokens: float) -> np.ndarray:
    """exp of the sample's mean NLL shrunk toward the corpus token-mean NLL by `shrink_tokens` pseudo-tokens."""
    if len(nll) == 0 or shrink_tokens == 0:
        return np.exp(nll)
    prior = float((nll * n_scored).sum() / n_scored.sum())
    return np.exp((nll * n_scored + shrink_tokens * prior) / (n_scored + shrink_tokens))


def _pct_name(p: float) -> str:
    return f"{p:g}".replace(".", "_")


def load_ranking(score_dirs: str | os.PathLike | list[str], shrink_tokens: float):
    """(ids, ranking ppl, shard, raw ppl) of the samples the perplexity step kept, in ledger order."""
    led = read_ledger(find_step_dir(score_dirs, SOURCE_STEP))
    kept = led[led.decision == "keep"]
    ids = np.asarray(passing_ids(led), dtype=object)
    kept = kept.set_index("sample_id").loc[ids]
    extra = [json.loads(x) for x in kept["extra"]]
    nll = np.asarray([e["nll"] for e in extra], dtype=np.float64)
    n_scored = np.asarray([e["n_scored"] for e in extra], dtype=np.float64)
    return ids, ranking_values(nll, n_scored, shrink_tokens), kept["shard"].to_numpy(dtype=object), np.exp(nll)


def percentile_bounds(ppl: np.ndarray, cfg: SliceConfig) -> tuple[float, float]:
    """The (low, high) perplexity values of the configured percentile range."""
    lo = float(np.percentile(ppl, cfg.low_pct)) if len(ppl) else 0.0
    hi = float(np.percentile(ppl, cfg.high_pct)) if len(ppl) else 0.0
    return lo, hi


def range_verdict(p: float, lo: float, hi: float, cfg: SliceConfig) -> str:
    """"above", "below" or "" (kept) for one ranking value against the range bounds."""
    if cfg.high_pct < 100 and p > hi:
        return "above"
    if cfg.low_pct > 0 and p < lo:
        return "below"
    return ""


def slice_of(ids: np.ndarray, ppl: np.ndarray, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank, slice index) per sample: ranked by ppl, ties by id (deterministic), equal-size slices."""
    n = len(ids)
    order = np.lexsort((ids.astype(str), ppl))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank, (rank * n_slices) // max(n, 1)


def slice_by_perplexity(score_dirs: str | os.PathLike | list[str], out: str | os.PathLike, config: SliceConfig) -> dict[str, Any]:
    """Apply `config` to the perplexity ledger found in `score_dirs`; write the ledger and id lists to `out`."""
    ids, ppl, shard, raw = load_ranking(score_dirs, config.shrink_tokens)
    odir = Path(out) / STEP
    odir.mkdir(parents=True, exist_ok=True)
    part = step_dir(out, STEP) / "part-all.parquet"
    if config.mode == "range":
        return _range(ids, ppl, shard, raw, config, part, odir)
    return _slices(ids, ppl, shard, raw, config, part, odir)


def _range(ids, ppl, shard, raw, cfg: SliceConfig, part: Path, odir: Path) -> dict[str, Any]:
    lo, hi = percentile_bounds(ppl, cfg)
    above, below = f"ppl_above_p{_pct_name(cfg.high_pct)}", f"ppl_below_p{_pct_name(cfg.low_pct)}"
    keep_ids = []
    with LedgerWriter(part, STEP) as w:
        for sid, p, sh, r in zip(ids, ppl, shard, raw):
            verdict = range_verdict(p, lo, hi, cfg)
            if verdict == "above":
                w.add(sid, "drop", above, score=p, shard=sh, threshold=hi, ppl=r)
            elif verdict == "below":
                w.add(sid, "drop", below, score=p, shard=sh, threshold=lo, ppl=r)
            else:
                w.add(sid, "keep", score=p, shard=sh, ppl=r)
                keep_ids.append(sid)
        counts = dict(w.counts)
        reasons = dict(w.reasons)
    (odir / "kept_ids.json").write_text(json.dumps(keep_ids))
    return {"mode": "range", "shrink_tokens": cfg.shrink_tokens, "n_inputs": len(ids), "n_kept": len(keep_ids), "ppl_low": lo, "ppl_high": hi,
            "counts": counts, "reasons": reasons, "kept_ids": str(odir / "kept_ids.json")}


def _slices(ids, ppl, shard, raw, cfg: SliceConfig, part: Path, odir: Path) -> dict[str, Any]:
    import pandas as pd

    n = len(ids)
    rank, sl = slice_of(ids, ppl, cfg.n_slices)
    df = pd.DataFrame({"sample_id": ids, "shard": shard, "ppl": ppl, "raw_ppl": raw, "rank": rank, "slice": sl})
    df = df.sort_values("rank")
    df.to_parquet(odir / "slices.parquet", index=False)
    manifest = []
    for k in range(cfg.n_slices):
        d = df[df.slice == k]
        f = odir / f"slice-{k:02d}.json"
        f.write_text(json.dumps(d.sample_id.tolist()))
        manifest.append({"slice": k, "n": int(len(d)), "ppl_min": float(d.ppl.min()) if len(d) else None,
                         "ppl_max": float(d.ppl.max()) if len(d) else None, "ids": str(f)})
    (odir / "slices.json").write_text(json.dumps(manifest, indent=1))
    with LedgerWriter(part, STEP) as w:
        for sid, p, sh, k, r in zip(ids, ppl, shard, sl, raw):
            w.add(sid, "keep", score=p, shard=sh, slice=int(k), ppl=r)
    return {"mode": "slices", "shrink_tokens": cfg.shrink_tokens, "n_inputs": n, "n_kept": n, "slices": manifest}
