"""CPU benchmark: overhead of the targeted generation step (reading the retrieved images from the pool
shards, prompt building, parsing/validation, tar + records + ledger writes per shard) as a share of its
wall time, next to raw `generate` on the same requests in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/targeted_overhead.py [--images 96] [--max-new-tokens 32]

Generator: the project's tiny random HF LLaVA (core/targeted/tiny_vlm.py) through the real transformers
backend; a random model rarely stops early, so each request costs about max_new_tokens decode steps.
Also measured (printed, not in the ratio): the per-sample cost of the filters (perplexity scoring,
MiniLM near-duplicate + SemDeDup, text decontamination) on outputs that all pass parsing, fed by a
scripted reply function (benchmark-only; it stands in for a good VLM so every filter sees every sample).
Headline (last line): `ratio: X` = share of the generation step's wall time spent outside `generate`.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pool(n: int):
    import numpy as np
    from PIL import Image

    from core.foundation.sample import Sample

    out = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        s = Sample.from_record({"id": f"p{i:06d}", "image": f"p{i:06d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Shapes."}]})
        s.image_bytes = [buf.getvalue()]
        out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import pandas as pd
    import torch

    from core.io.wds import list_shards, shard_name, write_shards
    from core.models.tiny_lm import ensure_tiny_lm
    from core.steps.rephrase.generate import Generation
    from core.targeted.config import tiny_targeted_config
    from core.targeted.filters import filter_generated
    from core.targeted.generate import generate_shards, load_pool_images, plan_requests
    from core.targeted.retrieve import RETRIEVED_COLUMNS, generated_id
    from core.targeted.tiny_vlm import build_tiny_llava
    from core.targeted.vlm import TransformersVLM

    torch.set_num_threads(args.threads)
    examples = {"count_like": [{"ref_id": f"r{i}", "question": f"How many {t} are there?", "answer": str(i)}
                               for i, t in enumerate(["stars", "circles", "squares", "triangles", "dots"])]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shards(pool(args.images), str(tmp / "pool"), max_samples=64)
        urls = {shard_name(u): u for u in list_shards(str(tmp / "pool"))}
        rows = [{"gen_id": generated_id(f"p{i:06d}"), "pool_id": f"p{i:06d}", "pool_shard": f"shard-{i // 64:06d}",
                 "subgroup": "count_like", "family": "counting", "similarity": 0.9, "ref_id": "r0", "rank": i,
                 "gen_shard": f"gen-{i // args.shard_size:06d}"} for i in range(args.images)]
        got = pd.DataFrame(rows, columns=RETRIEVED_COLUMNS)
        model = build_tiny_llava(tmp / "vlm", [f"Question: {e['question']}\nAnswer: {e['answer']}"
                                               for e in examples["count_like"]] * 20)
        cfg = tiny_targeted_config(model, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                   shard_size=args.shard_size, k_shot=2)
        gen = TransformersVLM(model, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              batch_size=cfg.batch_size, device="cpu")
        shards = sorted(got["gen_shard"].unique())
        plans = {}
        for s in shards:
            part = got[got.gen_shard == s]
            plans[s] = [p[1] for p in plan_requests(part, load_pool_images(part, urls), examples, cfg)]
        gen.generate(plans[shards[0]][:2])  # warm-up, not timed

        def raw() -> float:
            t = time.perf_counter()
            for s in shards:
                gen.generate(plans[s])
            return time.perf_counter() - t

        t_raw_before = raw()
        t0 = time.perf_counter()
        stats = generate_shards(got, urls, tmp / "run", cfg, examples, generator=gen)
        t_pipe = time.perf_counter() - t0
        t_raw_after = raw()
        t_inside = sum(s.seconds_generate for s in stats)
        rejected = sum(s.n - s.n_accepted for s in stats)

        # filters on outputs that all parse (a scripted reply per image stands in for a good VLM)
        class Scripted:
            name = "scripted"

            def generate(self, reqs):
                return [Generation(f"Question: How many shapes with seed {r.seed % 997} are there?\nAnswer: "
                                   f"{r.seed % 9}", "stop", 12) for r in reqs]

        generate_shards(got, urls, tmp / "run_ok", cfg, examples, generator=Scripted())
        lm = ensure_tiny_lm(tmp / "lm", [f"How many shapes are there? {i}" for i in range(200)], steps=30,
                            vocab_size=300, hidden=64, seq_len=64)
        ref_texts = {e["ref_id"]: f"{e['question']}\n{e['answer']}" for e in examples["count_like"]}
        evq = {"countbench": {f"cb{i}": f"How many {t} are in the photo?" for i, t in enumerate(["cats", "cars", "cups"])}}
        from core.steps.rephrase.similarity import SimilarityScorer

        enc = SimilarityScorer("minilm", device="cpu")
        enc.embed(["warm up"])
        t1 = time.perf_counter()
        counts = filter_generated(tmp / "run_ok", tmp / "filt", cfg, str(lm), ref_texts, evq, enc)
        t_filter = time.perf_counter() - t1

    n = args.images
    t_raw = (t_raw_before + t_raw_after) / 2
    share = (t_pipe - t_inside) / t_pipe
    print(f"images {n}, shards {len(shards)}, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
          f"threads {args.threads}; tiny random LLaVA on CPU ({rejected}/{n} outputs rejected by parsing)")
    print(f"raw generate on the same requests: {t_raw:.2f}s (before {t_raw_before:.2f}s, after {t_raw_after:.2f}s)")
    print(f"generation step: {t_pipe:.2f}s, of which generate {t_inside:.2f}s; outside generate "
          f"{t_pipe - t_inside:.3f}s = {1000 * (t_pipe - t_inside) / n:.2f} ms/sample")
    print(f"pipeline vs raw generate: {t_pipe / t_raw:.3f}x")
    print(f"filters (perplexity, MiniLM near-dup + SemDeDup, text decontam) on {n} valid samples: {t_filter:.2f}s = "
          f"{1000 * t_filter / n:.1f} ms/sample (CPU, 1 thread, includes model loads); passed: "
          f"{counts['decontam']['passed']}")
    print(f"ratio: {share:.3f}")


if __name__ == "__main__":
    main()
