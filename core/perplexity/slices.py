"""Filter or slice samples by perplexity: a kept percentile range, or N equal-size ablation slices.

Inputs are the ids the perplexity step kept (its ledger, score = ppl). Outputs, under `out`:

    range mode:   ledger/ppl_filter/part-all.parquet   keep | drop ppl_above_p90 | drop ppl_below_p10
                  ppl_filter/kept_ids.json
    slices mode:  ledger/ppl_filter/part-all.parquet   keep (extra: slice)
                  ppl_filter/slices.parquet            sample_id, shard, ppl, rank, slice
                  ppl_filter/slice-00.json ...         sorted id lists, slice 00 = lowest perplexity
                  ppl_filter/slices.json               manifest: n, ppl_min, ppl_max, file per slice

Slices have equal sizes (ranks split evenly; ties broken by sample id), so each ablation trains on the
same number of samples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.ledger import LedgerWriter, find_step_dir, passing_ids, read_ledger, step_dir

STEP = "ppl_filter"
SOURCE_STEP = "perplexity"


@dataclass
class SliceConfig:
    """What to do with the scored samples.

    :param mode: `range` (keep percentiles [low_pct, high_pct] of perplexity, drop the rest) or `slices`
        (keep all, emit `n_slices` equal-size id lists sorted by perplexity).
    :param low_pct: Lower kept percentile in range mode (0 keeps the lowest perplexities).
    :param high_pct: Upper kept percentile in range mode (90 drops the top 10% as `ppl_above_p90`).
    :param n_slices: Number of slices in slices mode (10 = deciles).
    """

    mode: str = "range"
    low_pct: float = 0.0
    high_pct: float = 90.0
    n_slices: int = 10

    def __post_init__(self) -> None:
        if self.mode not in ("range", "slices"):
            raise ValueError(f"mode {self.mode!r} not in (range, slices)")
        if not 0 <= self.low_pct < self.high_pct <= 100:
            raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {self.low_pct}, {self.high_pct}")
        if self.n_slices < 1:
            raise ValueError("n_slices must be >= 1")


def _pct_name(p: float) -> str:
    return f"{p:g}".replace(".", "_")


def slice_by_perplexity(score_dirs: str | os.PathLike | list[str], out: str | os.PathLike, config: SliceConfig) -> dict[str, Any]:
    """Apply `config` to the perplexity ledger found in `score_dirs`; write the ledger and id lists to `out`."""
    led = read_ledger(find_step_dir(score_dirs, SOURCE_STEP))
    kept = led[led.decision == "keep"]
    ids = np.asarray(passing_ids(led), dtype=object)
    ppl = kept.set_index("sample_id").loc[ids, "score"].to_numpy(dtype=np.float64)
    shard = kept.set_index("sample_id").loc[ids, "shard"].to_numpy(dtype=object)
    odir = Path(out) / STEP
    odir.mkdir(parents=True, exist_ok=True)
    part = step_dir(out, STEP) / "part-all.parquet"
    if config.mode == "range":
        return _range(ids, ppl, shard, config, part, odir)
    return _slices(ids, ppl, shard, config, part, odir)


def _range(ids, ppl, shard, cfg: SliceConfig, part: Path, odir: Path) -> dict[str, Any]:
    lo = float(np.percentile(ppl, cfg.low_pct)) if len(ppl) else 0.0
    hi = float(np.percentile(ppl, cfg.high_pct)) if len(ppl) else 0.0
    above, below = f"ppl_above_p{_pct_name(cfg.high_pct)}", f"ppl_below_p{_pct_name(cfg.low_pct)}"
    keep_ids = []
    with LedgerWriter(part, STEP) as w:
        for sid, p, sh in zip(ids, ppl, shard):
            if cfg.high_pct < 100 and p > hi:
                w.add(sid, "drop", above, score=p, shard=sh, threshold=hi)
            elif cfg.low_pct > 0 and p < lo:
                w.add(sid, "drop", below, score=p, shard=sh, threshold=lo)
            else:
                w.add(sid, "keep", score=p, shard=sh)
                keep_ids.append(sid)
        counts = dict(w.counts)
        reasons = dict(w.reasons)
    (odir / "kept_ids.json").write_text(json.dumps(keep_ids))
    return {"mode": "range", "n_inputs": len(ids), "n_kept": len(keep_ids), "ppl_low": lo, "ppl_high": hi,
            "counts": counts, "reasons": reasons, "kept_ids": str(odir / "kept_ids.json")}


def _slices(ids, ppl, shard, cfg: SliceConfig, part: Path, odir: Path) -> dict[str, Any]:
    import pandas as pd

    n = len(ids)
    order = np.lexsort((ids.astype(str), ppl))  # by ppl, ties by id: deterministic
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    sl = (rank * cfg.n_slices) // max(n, 1)
    df = pd.DataFrame({"sample_id": ids, "shard": shard, "ppl": ppl, "rank": rank, "slice": sl}).sort_values("rank")
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
        for sid, p, sh, k in zip(ids, ppl, shard, sl):
            w.add(sid, "keep", score=p, shard=sh, slice=int(k))
    return {"mode": "slices", "n_inputs": n, "n_kept": n, "slices": manifest}
