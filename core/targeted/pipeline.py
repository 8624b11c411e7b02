"""Targeted generation end to end without Flyte (tests, benchmark, and what the tasks call piece by piece):
reference -> subgroups -> retrieval -> generation (by shard) -> filters -> export as a named subset.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core.foundation.ledger import passing_ids, read_ledger, step_dir
from core.foundation.step import shards_of, write_json_atomic
from core.io.wds import iter_samples, shard_name
from core.targeted.config import TargetedConfig
from core.targeted.filters import FILTER_STEPS

log = logging.getLogger(__name__)


def reference_table(ref_shards: Sequence[str], cfg: TargetedConfig, include_ids: Iterable[str] | None = None,
                    encoder: Any = None) -> pd.DataFrame:
    """Subgroup table of the reference set (ingested shards, optionally restricted to trusted ids)."""
    from core.targeted.subgroups import build_subgroups

    inc = set(include_ids) if include_ids is not None else None
    return build_subgroups(iter_samples(ref_shards, include_ids=inc, load_images=False, verify_images=False), cfg,
                           encoder)


def reference_examples(ref: pd.DataFrame) -> dict[str, list[dict[str, str]]]:
    """subgroup -> all its used reference (ref_id, question, answer): the in-context example pool."""
    used = ref[ref["used"]]
    return {str(g): [{"ref_id": r.ref_id, "question": r.question, "answer": r.answer} for r in part.itertuples()]
            for g, part in used.groupby("subgroup", sort=True)}


def pool_shard_urls(pool_run: str) -> dict[str, str]:
    """pool shard name -> URL of the ingested pool shards (`<run>/shards/*.tar`, or a shard folder)."""
    return {shard_name(u): u for u in shards_of(pool_run)}


def merge_generation(dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Gather the per-shard generation outputs (map task outputs) into one directory (hard links when
    possible). A file present in two inputs must be identical (the run's generate_config.json); shard parts
    have distinct names, so a shard given twice with different content is an error."""
    out = Path(out_dir)
    seen: dict[str, str] = {}
    for d in dirs:
        d = Path(d)
        for f in sorted(p for p in d.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
            rel = f.relative_to(d)
            dst = out / rel
            if str(rel) in seen:  # the per-run generate_config.json is in every shard's output, identical
                if dst.read_bytes() != f.read_bytes():
                    raise ValueError(f"{rel} differs between {seen[str(rel)]} and {d}")
                continue
            seen[str(rel)] = str(d)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dst)
            except OSError:
                shutil.copy2(f, dst)
    for sub in ("ledger/tg_generate", "targeted/generations", "shards"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def generation_summary(gen_dir: str | os.PathLike) -> dict[str, Any]:
    """Counts of the generation step: requests, accepted, rejected by reason, tokens."""
    led = read_ledger(step_dir(gen_dir, "tg_generate"))
    reasons = led.loc[led["decision"] != "keep", "reason"].value_counts()
    return {"n_retrieved": int(len(led)), "n_accepted": int((led["decision"] == "keep").sum()),
            "rejected_by_reason": {str(k): int(v) for k, v in reasons.items()}}


def export_generated(gen_dir: str | os.PathLike, filter_dir: str | os.PathLike, out_dir: str,
                     cfg: TargetedConfig, max_samples: int = 1000) -> dict[str, Any]:
    """Export what passed every filter as the named subset `cfg.subset_name` (core/steps/export.py)."""
    from core.steps.export import ExportConfig, export_curated

    urls = shards_of(gen_dir)
    kept = passing_ids(read_ledger(step_dir(filter_dir, FILTER_STEPS[-1])))
    ecfg = ExportConfig(steps=list(FILTER_STEPS), max_samples=max_samples, subset_name=cfg.subset_name)
    return export_curated(urls, [str(gen_dir), str(filter_dir)], out_dir, ecfg, subset_ids=kept)


SUBGROUPS = "targeted/subgroups.parquet"  # split_reference's table inside its output folder


def write_reference_table(ref_run: str, cfg: TargetedConfig, include_ids: Iterable[str] | None,
                          out_dir: str | os.PathLike, encoder: Any = None) -> pd.DataFrame:
    """`reference_table` of an ingested reference run, written to `<out_dir>/targeted/subgroups.parquet`."""
    ref = reference_table(shards_of(ref_run), cfg, include_ids, encoder)
    path = Path(out_dir) / SUBGROUPS
    path.parent.mkdir(parents=True, exist_ok=True)
    ref.to_parquet(path, index=False)
    return ref


def read_reference_table(subgroups_dir: str | os.PathLike) -> pd.DataFrame:
    """The table `write_reference_table` wrote."""
    return pd.read_parquet(Path(subgroups_dir) / SUBGROUPS)


def build_generator(out: str, ref_run: str, ref: pd.DataFrame, cfg: TargetedConfig, steps: int) -> dict[str, Any]:
    """The tiny HF LLaVA generator at `out` (core/targeted/tiny_vlm.py), taught the reply shape on the reference
    set for `steps` CPU steps (0: random weights). Returns the training info ({} when not trained)."""
    from core.targeted.tiny_vlm import build_tiny_llava, train_tiny_llava, training_examples

    build_tiny_llava(out, [f"Question: {r.question}\nAnswer: {r.answer}" for r in ref.itertuples()], seed=cfg.seed)
    if not steps:
        return {}
    examples = training_examples(shards_of(ref_run), ref, reference_examples(ref), cfg)
    return train_tiny_llava(out, examples, steps=steps, seed=cfg.seed)


def filter_generations(gen_dirs: Sequence[str], gen_out: str | os.PathLike, filter_out: str | os.PathLike,
                       cfg: TargetedConfig, ppl_model: str, ref: pd.DataFrame, eval_cache: str = "",
                       benchmarks: Sequence[str] = (), encoder: Any = None) -> dict[str, Any]:
    """Merge the per-shard generation outputs into `gen_out`, run the filters (perplexity, near-duplicates of the
    reference and of each other, eval decontamination) into `filter_out` and write the funnel
    `<filter_out>/targeted/summary.json`; returns it ({retrieved, generation, filters})."""
    from core.targeted.filters import eval_questions, filter_generated

    if benchmarks and not eval_cache:
        raise ValueError("benchmarks given without eval_cache")
    gen = merge_generation(gen_dirs, gen_out)
    used = ref[ref["used"]]
    ref_texts = {r.ref_id: f"{r.question}\n{r.answer}" for r in used.itertuples()}
    evq = eval_questions(eval_cache, benchmarks) if eval_cache and benchmarks else {}
    counts = filter_generated(gen, filter_out, cfg, ppl_model, ref_texts, evq, encoder)
    generation = generation_summary(gen)
    summary = {"retrieved": generation["n_retrieved"], "generation": generation, "filters": counts}
    write_json_atomic(summary, Path(filter_out) / "targeted" / "summary.json", indent=1)
    return summary


def mix_exports(export_dirs: Sequence[str], out_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """One training directory from several exports (e.g. the baseline and a generated subset): their shards side
    by side (`shards/part<i>-<kind>-<shard>.tar`) and `manifest.json` listing the parts and the total count."""
    import json

    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    parts = []
    for i, root in enumerate(export_dirs):
        man = json.loads(Path(root, "manifest.json").read_text())
        for url in shards_of(root):  # an export: the shards its manifest names, <kind>/<name>.tar
            kind = os.path.basename(os.path.dirname(url))
            shutil.copy2(url, out / "shards" / f"part{i}-{kind}-{os.path.basename(url)}")
        parts.append({"subset": man.get("subset", ""), "selection": man.get("selection", ""),
                      "n_samples": man["n_samples"]})
    manifest = {"format": 1, "mixture": name, "parts": parts, "n_samples": sum(p["n_samples"] for p in parts)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def run_targeted(ref_shards: Sequence[str], ref_emb: str, pool_run: str, pool_emb: str, out_dir: str,
                 cfg: TargetedConfig, ppl_model: str, *, allowed_pool_ids: Iterable[str] | None = None,
                 ref_ids: Iterable[str] | None = None, eval_cache: str = "", benchmarks: Sequence[str] = (),
                 generator: Any = None, encoder: Any = None) -> dict[str, Any]:
    """All stages in one process, into `out_dir/{retrieve,generate,filter,export}`; returns the summary."""
    from core.steps.rephrase.similarity import SimilarityScorer
    from core.targeted.filters import eval_questions, filter_generated
    from core.targeted.generate import generate_shards
    from core.targeted.retrieve import retrieve

    out = Path(out_dir)
    encoder = encoder or SimilarityScorer("minilm", device="cpu")
    ref = reference_table(ref_shards, cfg, ref_ids, encoder)
    got = retrieve(ref, ref_emb, pool_emb, out / "retrieve", cfg, allowed_pool_ids)
    stats = generate_shards(got, pool_shard_urls(pool_run), out / "generate", cfg, reference_examples(ref),
                            generator=generator)
    used = ref[ref["used"]]
    ref_texts = {r.ref_id: f"{r.question}\n{r.answer}" for r in used.itertuples()}
    evq = eval_questions(eval_cache, benchmarks) if eval_cache and benchmarks else {}
    filt = filter_generated(out / "generate", out / "filter", cfg, ppl_model, ref_texts, evq, encoder)
    manifest = export_generated(out / "generate", out / "filter", str(out / "export"), cfg)
    summary = {"subgroups": used.groupby("subgroup").size().to_dict(), "retrieved": int(len(got)),
               "retrieved_by_subgroup": got.groupby("subgroup").size().to_dict(),
               "generation": generation_summary(out / "generate"), "filters": filt,
               "exported": manifest["n_samples"], "seconds_generate": sum(s.seconds_generate for s in stats),
               "seconds_generation_step": sum(s.seconds_total for s in stats)}
    write_json_atomic(summary, out / "summary.json", indent=1, default=str)
    return summary
