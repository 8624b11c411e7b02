"""Targeted generation on the demo data, Flyte-free, CPU (what the `targeted_demo` launch plan runs as tasks):

    PYTHONPATH=. python scripts/targeted_demo.py --out demo_out/targeted [--train_steps 300]

Writes the demo pool (seed 0) with planted eval copies, a reference set (seed 1, its clean ids), the eval
fixtures, ingests and embeds both with the tiny open_clip (in process), decontaminates the pool, trains the
reference LM for perplexity and the tiny VLM (reply shape only), then runs core.targeted.pipeline.run_targeted
and prints the funnel: retrieved -> generated -> rejected by reason -> filtered -> exported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out/targeted")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--train_steps", type=int, default=300, help="tiny VLM steps on the reference replies (0: random)")
    ap.add_argument("--budget", type=int, default=12)
    ap.add_argument("--reuse", action="store_true", help="reuse the data, embeddings and models of an earlier run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from core.foundation.ids import load_id_list
    from core.foundation.ledger import passing_ids, read_ledger, step_dir
    from core.foundation.step import shards_of
    from core.steps.perplexity.reference import train_reference_lm
    from core.targeted.config import tiny_targeted_config
    from core.targeted.pipeline import build_generator, reference_table, run_targeted

    o = args.out
    t0 = time.time()
    shutil.rmtree(f"{o}/run", ignore_errors=True)
    benches = ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"]
    if not args.reuse:
        prepare(o, args.n, benches)
    allowed = passing_ids(read_ledger(step_dir(f"{o}/pool_decontam", "decontam")))
    ref_ids = load_id_list(f"{o}/reference/ground_truth.json", key="clean")
    cfg = tiny_targeted_config(f"{o}/tiny_vlm", budget_per_subgroup=args.budget)
    ref = reference_table(shards_of(f"{o}/ref"), cfg, ref_ids)
    if not args.reuse:
        lm = train_reference_lm(shards_of(f"{o}/ref"), f"{o}/ref_lm", ref_ids)
        print("tiny VLM training:", build_generator(cfg.model, f"{o}/ref", ref, cfg, args.train_steps))
    lm = f"{o}/ref_lm"
    t1 = time.time()
    s = run_targeted(shards_of(f"{o}/ref"), f"{o}/ref_emb", f"{o}/pool", f"{o}/pool_emb", f"{o}/run", cfg,
                     str(lm), allowed_pool_ids=allowed, ref_ids=ref_ids, eval_cache=f"{o}/eval_cache",
                     benchmarks=benches)
    print(json.dumps(s, indent=1, default=str))
    print(f"prep {t1 - t0:.0f}s, targeted pipeline {time.time() - t1:.0f}s; export: {o}/run/export")


def prepare(o: str, n: int, benches: list[str]) -> None:
    """Demo pool + reference + eval fixtures, ingested, embedded (tiny open_clip, in process), pool decontaminated."""
    from core.demo import generate_demo, plant_eval_contamination
    from core.demo.eval_fixtures import write_fixtures
    from core.evals.eval_shards import eval_embedding_sets, write_eval_shards
    from core.foundation.step import shards_of
    from core.io.ingest import IngestConfig, ingest
    from core.steps.dedup.config import tiny_decontam_config
    from core.steps.dedup.mining import decontaminate
    from core.steps.embed.config import tiny_embed_config
    from core.steps.embed.pipeline import embed_shards

    write_fixtures(f"{o}/eval_cache")
    generate_demo(f"{o}/data", n, 0)
    plant_eval_contamination(f"{o}/data", f"{o}/eval_cache", per_benchmark=2)
    generate_demo(f"{o}/reference", 300, 1, corrupt=False)
    for name, src in (("pool", "data"), ("ref", "reference")):
        shutil.rmtree(f"{o}/{name}", ignore_errors=True)
        ingest(IngestConfig(source=f"{o}/{src}/data.json", image_root=f"{o}/{src}/images", run_dir=f"{o}/{name}",
                            shard_max_samples=100))
        embed_shards(shards_of(f"{o}/{name}"), f"{o}/{name}_emb", tiny_embed_config(), use_ray=False)
    write_eval_shards(f"{o}/eval_cache", benches, f"{o}/evalsets")
    embed_shards(shards_of(f"{o}/evalsets"), f"{o}/evalsets_emb", tiny_embed_config(), use_ray=False)
    decontaminate(f"{o}/pool_emb", f"{o}/pool_decontam", eval_embedding_sets(f"{o}/evalsets_emb"),
                  tiny_decontam_config(device="cpu"))

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
