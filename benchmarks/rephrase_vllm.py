"""GPU benchmark: generated tokens/s of the rephrase pipeline vs raw `LLM.chat` on the same prompts
(goal >= 0.9), and samples/s, for a ~0.5-1.5B instruct model on vLLM.

    PYTHONPATH=. python benchmarks/rephrase_vllm.py --model /models/Qwen2.5-1.5B-Instruct [--samples 8192]

Needs the vllm image (vllm installed) and a CUDA GPU; anywhere else it exits with status 2 and says why.
One engine is built and used for both measurements: first a warm-up, then raw `LLM.chat` over all
requests in one call (vLLM's best case), then the pipeline (`rephrase_shards`: chunks, seeds, token
counting, validation, ledger and records I/O). Headline (last line): `ratio: X` = pipeline generated
tokens/s / raw generated tokens/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="local dir of the instruct model (e.g. Qwen2.5-1.5B-Instruct)")
    ap.add_argument("--tokenizer", default="", help="training tokenizer dir for token counts (default: model)")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--tensor-parallel", type=int, default=1)
    args = ap.parse_args()

    if importlib.util.find_spec("vllm") is None:
        print("rephrase_vllm: vllm is not installed; run this in the vllm image on a GPU machine", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("rephrase_vllm: no CUDA GPU visible; this benchmark measures vLLM on a GPU", file=sys.stderr)
        return 2

    sys.path.insert(0, str(Path(__file__).parent))
    from rephrase_overhead import make_samples

    from core.steps.rephrase.chunks import prepare_chunk
    from core.steps.rephrase.config import qwen_rephrase_config
    from core.steps.rephrase.generate import VLLMGenerator
    from core.steps.rephrase.step import rephrase_shards
    from core.steps.rephrase.tokens import TokenCounter

    cfg = qwen_rephrase_config(args.model, args.tokenizer)
    cfg.chunk_size, cfg.max_new_tokens, cfg.tensor_parallel = args.chunk_size, args.max_new_tokens, args.tensor_parallel
    gen = VLLMGenerator(cfg.model, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                        tensor_parallel=cfg.tensor_parallel, gpu_memory_utilization=cfg.gpu_memory_utilization)
    counter = TokenCounter(cfg.tokenizer_path)
    samples = make_samples(args.samples)
    _plans, requests, seeds = prepare_chunk(samples, cfg)
    gen.generate(requests[:64], seeds[:64])  # warm-up: CUDA graphs, allocator

    params = [gen.sampling_params(s) for s in seeds]
    t0 = time.perf_counter()
    outs = gen.llm.chat(requests, sampling_params=params, use_tqdm=False)
    t_raw = time.perf_counter() - t0
    raw_tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = rephrase_shards([("shard-000000", lambda: iter(samples))], tmp, cfg, gen, counter)
        t_pipe = time.perf_counter() - t0
    res = list(res.results.values())
    pipe_tokens = sum(r.generated_tokens for r in res)
    raw_tps, pipe_tps = raw_tokens / t_raw, pipe_tokens / t_pipe
    print(f"device: {torch.cuda.get_device_name(0)}  model: {args.model}  samples: {len(samples)}  "
          f"requests: {len(requests)}")
    print(f"raw LLM.chat: {raw_tokens} tokens in {t_raw:.1f}s = {raw_tps:.0f} tok/s, {len(samples) / t_raw:.1f} samples/s")
    print(f"pipeline:     {pipe_tokens} tokens in {t_pipe:.1f}s = {pipe_tps:.0f} tok/s, "
          f"{len(samples) / t_pipe:.1f} samples/s, accepted {sum(r.n_modified for r in res)}")
    print(f"ratio: {pipe_tps / raw_tps:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
