"""Claim: batched generation (one `generate` call per batch) is faster than one request at a time.
Same backend (transformers, a tiny local HF LLaVA on CPU), same requests (fixture items of three
benchmarks), batch_size=1 baseline vs batch_size=8, measured in this run.

    PYTHONPATH=. .venv/bin/python benchmarks/evals_batching.py [--n 48] [--batch 8]

Last line: `speedup: <time batch 1 / time batch N>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from core.demo.eval_fixtures import write_fixtures  # noqa: E402
from core.evals.backends import GenRequest, load_backend  # noqa: E402
from core.evals.base import EvalItem  # noqa: E402
from core.evals.registry import get_benchmark  # noqa: E402
from core.evals.runner import decode_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48, help="requests")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from evals_doubles import make_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_llava(os.path.join(tmp, "ckpt"))
        cache = os.path.join(tmp, "cache")
        write_fixtures(cache, defects=False)
        reqs = []
        for name in ("countbench", "chartqa", "docvqa"):
            b = get_benchmark(name)
            for item in b.load(os.path.join(cache, name)):
                if isinstance(item, EvalItem):
                    reqs.append(GenRequest(decode_images(item), b.prompt(item), args.max_new_tokens))
        reqs = (reqs * (args.n // len(reqs) + 1))[: args.n]
        backend = load_backend("transformers", ckpt, "cpu")
        backend.generate(reqs[:2])  # warm-up
        times = {}
        for bs in (1, args.batch):
            t0 = time.perf_counter()
            for i in range(0, len(reqs), bs):
                backend.generate(reqs[i : i + bs])
            times[bs] = time.perf_counter() - t0
            print(f"batch_size={bs:2d}: {len(reqs)} requests in {times[bs]:.2f}s ({len(reqs) / times[bs]:.1f} req/s)")
        print(f"speedup: {times[1] / times[args.batch]:.1f}x")


if __name__ == "__main__":
    main()
