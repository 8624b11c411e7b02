"""Filters of generated samples, all through the existing steps, each with its own ledger:

1. `perplexity` + `ppl_filter`: the perplexity step (core/steps/perplexity) scores the assistant turns given the
   question with a reference LM; `slice_by_perplexity` in range mode drops by percentile. `ppl_direction`
   `drop_high` keeps [0, p] (drops disfluent text, `ppl_above_pP`), `drop_low` keeps [100 - p, 100]
   (drops template-like text, `ppl_below_pQ`), `none` keeps [0, 100].
2. `tg_dedup`: MiniLM vectors of question + answer. Near-copies of a reference item (its nearest reference
   by `core.steps.dedup.mining.mine_neighbours`, similarity > reference_max_similarity) are dropped
   (`near_duplicate:reference`), then SemDeDup (`semdedup_arrays`, eps mode) among the generated samples
   (`near_duplicate:generated`).
3. `decontam`: the existing decontamination (`core.steps.dedup.mining.decontaminate`, kind `text`) of the
   generated questions against every eval set's questions (MiniLM), `eval_contamination:<benchmark>`.
The generation step already decontaminated on images (retrieval searched only decontaminated pool ids).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from core.foundation.ledger import LedgerWriter, passing_ids, read_ledger, step_dir
from core.foundation.step import write_json_atomic, write_parquet_atomic
from core.targeted.config import TargetedConfig

log = logging.getLogger(__name__)
FILTER_STEPS = ["tg_generate", "perplexity", "ppl_filter", "tg_dedup", "decontam"]
DEDUP_STEP = "tg_dedup"


def _text(q: str, a: str) -> str:
    return f"{q}\n{a}"


def ppl_bounds(cfg: TargetedConfig) -> tuple[float, float]:
    """(low_pct, high_pct) kept by the perplexity cut."""
    if cfg.ppl_direction == "drop_high":
        return 0.0, cfg.ppl_percentile
    if cfg.ppl_direction == "drop_low":
        return 100.0 - cfg.ppl_percentile, 100.0
    return 0.0, 100.0


def write_text_embeddings(path: Path, ids: Sequence[str], x: np.ndarray) -> None:
    """Vectors in the embed step's Parquet format (sample_id, image_emb null, text_emb) for decontaminate."""
    t = pa.table({"sample_id": pa.array(list(ids), pa.string()),
                  "image_emb": pa.nulls(len(ids), pa.list_(pa.float32())),
                  "text_emb": pa.array([row.tolist() for row in x], pa.list_(pa.float32()))})
    write_parquet_atomic(t, path)


def dedup_generated(out: Path, samples: dict[str, tuple[str, str, str]], ref_texts: dict[str, str],
                    cfg: TargetedConfig, encoder: Any) -> dict[str, np.ndarray]:
    """Ledger `tg_dedup` over `samples` (id -> (shard, question, answer)); returns the question vectors."""
    from core.steps.dedup.config import SemDedupConfig
    from core.steps.dedup.mining import mine_neighbours
    from core.steps.dedup.semdedup import semdedup_arrays

    ids = list(samples)
    x = encoder.embed([_text(q, a) for _, q, a in samples.values()]) if ids else np.zeros((0, 1), np.float32)
    qx = encoder.embed([q for _, q, _ in samples.values()]) if ids else np.zeros((0, 1), np.float32)
    drop: dict[str, tuple[str, float, str]] = {}
    if ids and ref_texts:
        rids = list(ref_texts)
        mined = mine_neighbours(ids, x, rids, encoder.embed(list(ref_texts.values())), 1, "reference").to_pandas()
        for r in mined.itertuples(index=False):
            if r.similarity > cfg.reference_max_similarity:
                drop[r.eval_id] = ("near_duplicate:reference", float(r.similarity), r.sample_id)
    rest = [i for i in ids if i not in drop]
    if len(rest) > 1:
        pos = {sid: k for k, sid in enumerate(ids)}
        sd = SemDedupConfig(n_clusters=max(1, len(rest) // 50), eps=cfg.dedup_eps, device="cpu", sweep_subsample=0,
                            seed=cfg.seed)
        res = semdedup_arrays(rest, x[[pos[i] for i in rest]], sd)
        removed = set(np.asarray(res.scores.sample_id)[res.decision.removed].tolist())
        nb = dict(zip(np.asarray(res.scores.sample_id).tolist(), np.asarray(res.scores.neighbour_id).tolist()))
        m = dict(zip(np.asarray(res.scores.sample_id).tolist(), np.asarray(res.scores.m).tolist()))
        for sid in removed:
            drop[sid] = ("near_duplicate:generated", float(m[sid]), nb[sid])
    with LedgerWriter(step_dir(out, DEDUP_STEP) / "part-all.parquet", DEDUP_STEP) as led:
        for sid, (shard, _, _) in samples.items():
            if sid in drop:
                why, sim, near = drop[sid]
                led.add(sid, "drop", why, sim, shard, nearest=near)
            else:
                led.add(sid, "keep", "", None, shard)
    return {sid: qx[k] for k, sid in enumerate(ids)}


def eval_questions(eval_cache: str, benchmarks: Sequence[str]) -> dict[str, dict[str, str]]:
    """{benchmark: {eval id: question text}} of every loadable eval item (the test items)."""
    from core.evals.base import EvalItem
    from core.evals.eval_shards import eval_item_sample
    from core.evals.registry import get_benchmark
    from core.targeted.subgroups import first_pair

    out: dict[str, dict[str, str]] = {}
    for b in benchmarks:
        qs: dict[str, str] = {}
        for item in get_benchmark(b).load(f"{eval_cache.rstrip('/')}/{b}"):
            if isinstance(item, EvalItem):
                try:
                    qs[item.id] = first_pair(eval_item_sample(b, item))[0]
                except Exception as e:  # a broken eval item is quarantined by the eval pipeline; note and go on
                    log.warning("eval item %s/%s not usable for decontamination: %s", b, item.id, e)
        out[b] = qs
    return out


def filter_generated(gen_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: TargetedConfig, ppl_model: str,
                     ref_texts: dict[str, str], eval_qs: dict[str, dict[str, str]], encoder: Any = None) -> dict[str, Any]:
    """Run the three filters on the accepted generations of `gen_dir` (merged generation output); ledgers
    go to `out_dir` (`FILTER_STEPS[1:]`). Returns counts per step and reason."""
    from core.foundation.configs import override
    from core.foundation.step import Passing, shards_of
    from core.io.wds import iter_samples
    from core.steps.dedup.config import DecontamConfig
    from core.steps.dedup.mining import decontaminate
    from core.steps.perplexity.config import tiny_perplexity_config
    from core.steps.perplexity.pipeline import score_shards
    from core.steps.perplexity.slices import SliceConfig, slice_by_perplexity
    from core.steps.rephrase.similarity import SimilarityScorer

    out = Path(out_dir)
    gen = Path(gen_dir)
    passed = set(passing_ids(read_ledger(step_dir(gen, "tg_generate"))))
    urls = shards_of(gen)
    pcfg = override(tiny_perplexity_config(ppl_model), fanout=cfg.filter_fanout)  # scoring over the fan-out
    score_shards(urls, out, pcfg, prev=Passing.read(gen, "tg_generate"))
    if not step_dir(out, "perplexity").exists():  # nothing accepted: the step still publishes its (empty) ledger
        with LedgerWriter(step_dir(out, "perplexity") / "part-empty.parquet", "perplexity"):
            pass
    lo, hi = ppl_bounds(cfg)
    if passed:
        slice_by_perplexity(out, out, SliceConfig(mode="range", low_pct=lo, high_pct=hi))
    else:
        with LedgerWriter(step_dir(out, "ppl_filter") / "part-all.parquet", "ppl_filter"):
            pass
    kept = set(passing_ids(read_ledger(step_dir(out, "ppl_filter"))))
    samples: dict[str, tuple[str, str, str]] = {}
    from core.targeted.subgroups import SUFFIXES, first_pair

    suffixes = tuple(dict.fromkeys([*(p.question_suffix for p in cfg.prompts.values() if p.question_suffix), *SUFFIXES]))
    for s in iter_samples(urls, include_ids=kept, load_images=False, verify_images=False):
        q, a = first_pair(s, suffixes)
        samples[s.id] = (s.shard, q, a)
    encoder = encoder or SimilarityScorer("minilm", device="cpu")
    qvec = dedup_generated(out, samples, ref_texts, cfg, encoder)
    kept2 = passing_ids(read_ledger(step_dir(out, DEDUP_STEP)))
    emb = out / "targeted" / "text_emb"
    write_text_embeddings(emb / "generated.parquet", kept2, np.stack([qvec[i] for i in kept2]) if kept2 else
                          np.zeros((0, 1), np.float32))
    evals = {}
    for b, qs in eval_qs.items():
        if qs:
            f = emb / "evals" / f"{b}.parquet"
            write_text_embeddings(f, list(qs), encoder.embed(list(qs.values())))
            evals[b] = str(f)
    if evals and kept2:
        dc = DecontamConfig(threshold=cfg.decontam_threshold, k=1, kind="text", device="cpu", fanout=cfg.filter_fanout)
        decontaminate(emb / "generated.parquet", out, evals, dc, Passing.read(out, DEDUP_STEP))
    else:  # nothing to compare: every input is kept with the reason why the check did not run
        with LedgerWriter(step_dir(out, "decontam") / "part-all.parquet", "decontam") as led:
            for sid in kept2:
                led.add(sid, "keep", "decontam_skipped:no_eval_sets", None, samples[sid][0])
    counts: dict[str, Any] = {}
    for st in FILTER_STEPS[1:]:
        df = read_ledger(step_dir(out, st))
        counts[st] = {"inputs": int(len(df)), "passed": int(df["decision"].isin(["keep", "modify"]).sum()),
                      "reasons": {str(k): int(v) for k, v in df.loc[df["reason"] != "", "reason"].value_counts().items()
                                  if df.loc[df["reason"] == k, "decision"].iloc[0] in ("drop", "quarantine")}}
    write_json_atomic(counts, out / "targeted" / "filters.json", indent=1)
    kept = passing_ids(read_ledger(step_dir(out, FILTER_STEPS[-1])))
    write_json_atomic(kept, out / "targeted" / "kept_ids.json")  # the named subset the export takes
    return counts
