"""Batched perplexity scorer vs a naive one-sample-at-a-time HF loop, same samples and model, one run.

    PYTHONPATH=. .venv/bin/python benchmarks/ppl_batched.py [--n 400] [--model DIR --device cuda --dtype bfloat16]

Default model: the project's tiny LM (trained once into .state/bench_tiny_lm). Both sides score the same
encoded samples (tokenization excluded from both timings); per-sample perplexities must agree to
rel. err <= 1e-4 in fp32 (checked, reported as `max_rel_err`). Prints padding waste and tokens/s;
the last line is `speedup: Nx` (batched tokens/s over naive tokens/s).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import replace

from core.foundation.sample import Sample, Turn
from core.models.tiny_lm import ensure_tiny_lm
from core.steps.perplexity import PerplexityConfig, PerplexityScorer, naive_scores

WORDS = ("the a chart shows bar line value year total count red blue green left right top bottom table row "
         "column person car tree sky water document title date amount price number of items in image is are "
         "there how many what which color where").split()


def make_samples(n: int, seed: int) -> list[Sample]:
    """Conversations of 1-4 rounds with answers of 3-60 words: a realistic spread of lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for r in range(rng.choice([1, 1, 2, 3, 4])):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + "?"
            turns.append(Turn("human", ("<image>\n" if r == 0 else "") + q.capitalize()))
            turns.append(Turn("gpt", " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))).capitalize() + "."))
        out.append(Sample(id=f"b{i:05d}", conversations=turns, images=["x.jpg"]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="samples")
    ap.add_argument("--model", default="", help="HF causal LM dir (default: the project's tiny LM)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mode", default="assistant_only", choices=["assistant_only", "text"])
    ap.add_argument("--batch-tokens", type=int, default=0,
                    help="token budget per batch (0: 2048 on cpu, where activations must stay in cache; 16384 on cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for both sides)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    ss = make_samples(a.n, a.seed)
    model_dir = a.model or ensure_tiny_lm(".state/bench_tiny_lm", [s.text("all") for s in make_samples(300, 99)],
                                          steps=100)
    bt = a.batch_tokens or (2048 if a.device == "cpu" else 16384)
    cfg = PerplexityConfig(model=model_dir, mode=a.mode, device=a.device, dtype=a.dtype, batch_tokens=bt,
                           max_length=min(2048, bt))
    sc = PerplexityScorer(cfg)
    enc, bad = sc.encode(ss)
    assert not bad, bad[:3]
    tokens = sum(len(e.input_ids) for e in enc)
    print(f"model={model_dir} device={sc.device} dtype={a.dtype} mode={a.mode} batch_tokens={bt} samples={len(enc)} tokens={tokens} "
          f"mean_len={tokens / len(enc):.1f} max_len={max(len(e.input_ids) for e in enc)}")

    sc.score_encoded(enc[:8])  # warm-up both paths (allocator, kernels)
    naive_scores(sc.model, enc[:8], sc.device)
    sync = torch.cuda.synchronize if sc.device.startswith("cuda") else (lambda: None)

    sc.stats = type(sc.stats)()
    sync()
    t0 = time.perf_counter()
    batched = sc.score_encoded(enc)
    sync()
    tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_scores(sc.model, enc, sc.device)
    sync()
    tn = time.perf_counter() - t0

    rel = max(abs(math.exp(n) - b.ppl) / math.exp(n) for n, b in zip(naive, batched))
    unsorted = PerplexityScorer(replace(cfg, sort_buckets=False), sc.tok, sc.model)
    unsorted.score_encoded(enc)
    print(f"batched: {tokens / tb:,.0f} tokens/s ({tb:.2f}s, {sc.stats.n_batches} batches, "
          f"padding_waste={sc.stats.padding_waste:.3f}; unsorted batches would waste {unsorted.stats.padding_waste:.3f})")
    print(f"naive:   {tokens / tn:,.0f} tokens/s ({tn:.2f}s, {len(enc)} forward passes)")
    print(f"max_rel_err(ppl)={rel:.2e} (fp32 target <= 1e-4{'' if a.dtype == 'float32' else '; not fp32, informative'})")
    if a.dtype == "float32" and rel > 1e-4:
        print("FAIL: batched and naive perplexities disagree", file=sys.stderr)
        sys.exit(1)
    print(f"speedup: {tn / tb:.1f}x")


if __name__ == "__main__":
    main()
