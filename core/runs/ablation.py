"""Ablation grid: named dataset variants chosen from a run's ledgers (their comparison: `core.runs.ablation_compare`).

A variant is a string:
    baseline              every sample that passed ingest (and embed, when there is an embed ledger)
    semdedup@0.1          baseline minus SemDeDup's round(0.1*N) most redundant samples (target mode on M)
    semdedup_eps@0.05     baseline minus samples with M > 1 - eps
    ppl@0-90              baseline samples whose (shrunk) perplexity is within the 0..90th percentile
    ppl_decile@3          the 3rd perplexity decile (1 = lowest perplexity, 10 = highest)
    rephrased             baseline with the accepted rephrasings applied
    decontam              baseline minus samples flagged as eval contamination
    mined                 only the training samples mined as nearest neighbours of eval items (k per
                          item, DecontamConfig.k), minus the contaminated ones: targeted selection
Each algorithm is applied in isolation to the baseline (the team's habit), so the ledgers used here
must come from steps whose inputs were the baseline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.foundation.ledger import LedgerError, find_step_dir, passing_ids, read_ledger

KINDS = ("baseline", "semdedup", "semdedup_eps", "ppl", "ppl_decile", "rephrased", "decontam", "mined")
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)(?:@(?P<arg>[0-9.]+(?:-[0-9.]+)?))?$")


@dataclass(frozen=True)
class Variant:
    """A parsed variant spec."""

    spec: str
    kind: str
    args: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        """A file- and Flyte-safe name (`semdedup@0.1` -> `semdedup-0.1`)."""
        return self.spec.replace("@", "-")

    @property
    def needs(self) -> str:
        """The step whose ledger this variant reads ('' for baseline/rephrased)."""
        return {"semdedup": "semdedup", "semdedup_eps": "semdedup", "ppl": "perplexity", "ppl_decile": "perplexity",
                "decontam": "decontam", "mined": "decontam"}.get(self.kind, "")


def parse_variant(spec: str) -> Variant:
    """Parse and validate a variant string (see module docstring); raises ValueError with the grammar."""
    m = _SPEC.match(spec.strip())
    if not m or m.group("kind") not in KINDS:
        raise ValueError(f"bad variant {spec!r}; kinds: {', '.join(KINDS)} (e.g. semdedup@0.1, ppl@0-90, ppl_decile@3)")
    kind, arg = m.group("kind"), m.group("arg")
    args = tuple(float(a) for a in arg.split("-")) if arg else ()
    want = {"baseline": 0, "rephrased": 0, "decontam": 0, "mined": 0, "semdedup": 1, "semdedup_eps": 1, "ppl": 2, "ppl_decile": 1}[kind]
    if len(args) != want:
        raise ValueError(f"variant {spec!r}: {kind} takes {want} argument(s)")
    if kind == "semdedup" and not 0 <= args[0] <= 1:
        raise ValueError(f"variant {spec!r}: removal fraction must be in [0, 1]")
    if kind == "ppl" and not 0 <= args[0] < args[1] <= 100:
        raise ValueError(f"variant {spec!r}: percentile range must satisfy 0 <= lo < hi <= 100")
    if kind == "ppl_decile" and not (args[0].is_integer() and 1 <= args[0] <= 10):
        raise ValueError(f"variant {spec!r}: decile must be 1..10")
    return Variant(spec.strip(), kind, args)


def baseline_ids(run_dirs: Sequence[str]) -> list[str]:
    """Ids that passed the validity steps: embed when its ledger exists (it only quarantines), else ingest."""
    for step in ("embed", "ingest"):
        try:
            return passing_ids(read_ledger(find_step_dir(run_dirs, step)))
        except LedgerError:
            continue
    raise LedgerError(f"no ingest or embed ledger in {list(run_dirs)}")


def select_variant(variant: Variant, run_dirs: Sequence[str]) -> list[str]:
    """The sample ids of a variant, in baseline order."""
    base = baseline_ids(run_dirs)
    if variant.kind in ("baseline", "rephrased"):
        return base
    led = read_ledger(find_step_dir(run_dirs, variant.needs))
    base_set = set(base)
    if set(led["sample_id"]) - base_set:
        raise LedgerError(f"{variant.needs} ledger decides ids outside the baseline: it was not run in isolation")
    if variant.kind in ("semdedup", "semdedup_eps"):
        from core.steps.dedup.semdedup import decide_eps, decide_target

        # every semdedup input counts in N; cluster-first members have no M (NaN) and are never removed
        m = led["score"].to_numpy(dtype=np.float64, na_value=np.nan)
        ids = led["sample_id"].to_numpy(dtype=object)
        floor = None  # the floor the semdedup step ran with (target mode never removes below it)
        summary = find_step_dir(run_dirs, variant.needs).parent.parent / "semdedup" / "summary.json"
        if summary.exists():
            floor = json.loads(summary.read_text()).get("min_similarity")
        dec = decide_target(m, ids, variant.args[0], floor) if variant.kind == "semdedup" else decide_eps(m, variant.args[0])
        removed = set(ids[np.asarray(dec.removed, dtype=bool)])
        return [i for i in base if i not in removed]
    if variant.kind == "decontam":
        dropped = set(led.loc[led["decision"] == "drop", "sample_id"])
        return [i for i in base if i not in dropped]
    if variant.kind == "mined":
        import pandas as pd

        files = sorted((find_step_dir(run_dirs, "decontam").parent.parent / "mining").glob("*.parquet"))
        if not files:
            raise LedgerError("mined variant: the decontam step wrote no mining/*.parquet")
        mined = set(pd.concat([pd.read_parquet(f, columns=["sample_id"]) for f in files])["sample_id"])
        passed = set(passing_ids(led))  # a contaminated neighbour is the eval item itself: never trained on
        return [i for i in base if i in mined and i in passed]
    # perplexity: the filter step's own ranking, bounds and slicing, so the ablation and the filter agree
    from core.steps.perplexity.slices import SliceConfig, load_ranking, percentile_bounds, range_verdict, slice_of

    cfg = SliceConfig(mode="range", low_pct=variant.args[0], high_pct=variant.args[1]) if variant.kind == "ppl" \
        else SliceConfig(mode="slices", n_slices=10)
    ids, ppl, _, _ = load_ranking(list(run_dirs), cfg.shrink_tokens)
    if variant.kind == "ppl":
        lo, hi = percentile_bounds(ppl, cfg)
        chosen = [sid for sid, p in zip(ids, ppl) if not range_verdict(p, lo, hi, cfg)]
    else:
        _, sl = slice_of(ids, ppl, cfg.n_slices)
        chosen = list(ids[sl == int(variant.args[0]) - 1])
    keep = set(chosen)
    return [i for i in base if i in keep]
