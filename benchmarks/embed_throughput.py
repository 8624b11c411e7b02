"""Embedding throughput: end to end (read -> decode -> preprocess -> forward -> write) / pure forward.

Both are measured in this run, with the same model, batch size, threads and images: the baseline runs
the model on batches that were decoded and preprocessed beforehand (untimed); the end-to-end run is
`embed_shards(use_ray=False)` on WDS shards holding the same images as JPEG. A ratio of 1.0 means the
model never waits for the CPU side. Image embeddings only (`what=image`).

    PYTHONPATH=. .venv/bin/python benchmarks/embed_throughput.py --model tiny
    PYTHONPATH=. .venv/bin/python benchmarks/embed_throughput.py --model vit-b-16
    PYTHONPATH=. .venv/bin/python benchmarks/embed_throughput.py --model siglip2 --device cuda --cache-dir /models/hf

Last line: `ratio: X`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

MODELS = {
    "tiny": dict(model_name="mmcurate-tiny-vit", pretrained=None, n=768, batch=64),
    "vit-b-16": dict(model_name="ViT-B-16", pretrained=None, n=32, batch=16),
    "siglip2": dict(model_name="hf-hub:timm/ViT-SO400M-14-SigLIP2-378", pretrained=None, n=4096, batch=256),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--n-images", type=int, default=None, help="images (one per sample); default per model")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--image-px", type=int, default=384, help="side of the stored JPEGs")
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    # CPU default: one core for the model, one for the reader/decoder (what an actor with 2 CPUs does)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--decode-workers", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for both measurements")
    args = ap.parse_args()

    import torch

    from core.io.images import decode_image
    from core.steps.embed.config import EmbedConfig
    from core.steps.embed.pipeline import embed_shards
    from core.steps.embed.worker import ShardEmbedWorker
    from tests.embed_data import encode, sample, scene, write_test_shards

    spec = MODELS[args.model]
    n = args.n_images or spec["n"]
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    cfg = EmbedConfig(
        model_name=spec["model_name"], pretrained=spec["pretrained"], device="cuda" if cuda else "cpu",
        precision="amp_bf16" if cuda else "fp32", num_gpus=1.0 if cuda else 0.0,
        batch_size=args.batch_size or spec["batch"], cpus_per_actor=args.threads,
        decode_workers=args.decode_workers, what="image", out_dtype="float16", cache_dir=args.cache_dir,
    )
    tmp = tempfile.mkdtemp(prefix="embed-bench-")
    try:
        jpegs = [encode(scene(i, args.image_px), quality=90) for i in range(n)]
        urls = write_test_shards(f"{tmp}/shards", [sample(f"b{i:06d}", [j]) for i, j in enumerate(jpegs)],
                                 per_shard=args.per_shard)
        t = time.perf_counter()
        worker = ShardEmbedWorker(cfg)  # loads the model once (cached in-process for embed_shards too)
        print(f"model {cfg.model_name} on {worker.image.lm.device}, batch {cfg.batch_size}, {n} images "
              f"{args.image_px}px, torch threads {torch.get_num_threads()}, decode workers {cfg.decode_workers}; "
              f"load {time.perf_counter() - t:.1f}s")
        pixels = [worker.image.preprocess(decode_image(j)) for j in jpegs]  # pre-decoded, untimed
        batches = [torch.stack(pixels[i : i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]
        if cuda:
            batches = [b.pin_memory() for b in batches]
        worker.image.embed_pixels(batches[0])  # warm-up

        cpu_ms: dict[str, list[float]] = {"forward": [], "end_to_end": []}  # process CPU (all threads) per image

        def forward() -> float:
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                worker.image.embed_pixels(b)  # includes host->device copy and the result back on host
            cpu_ms["forward"].append((time.process_time() - c0) / n * 1e3)
            return n / (time.perf_counter() - t0)

        def end_to_end(k: int) -> float:
            out = f"{tmp}/run{k}/embed"
            t0, c0 = time.perf_counter(), time.process_time()
            s = embed_shards(urls, out, cfg, use_ray=False)  # ledger: {tmp}/run{k}/ledger/embed
            dt = time.perf_counter() - t0
            cpu_ms["end_to_end"].append((time.process_time() - c0) / n * 1e3)
            assert s.n_images == n, s.as_dict()
            agg = {k: sum(x[k] for x in s.shards) for k in ("forward_s", "wait_s", "decode_s", "wall_s")}
            print("  end-to-end stages: " + ", ".join(f"{k} {v:.2f}" for k, v in agg.items()) + f", total {dt:.2f}s"
                  f"; the model waited for input {agg['wait_s'] / agg['wall_s']:.1%} of the time")
            return n / dt

        fwd, e2e = [], []
        for k in range(args.repeats):  # interleaved, so load from other processes hits both alike
            fwd.append(forward())
            e2e.append(end_to_end(k))
            print(f"repeat {k}: forward {fwd[-1]:.1f} img/s, end-to-end {e2e[-1]:.1f} img/s")
        f, e = max(fwd), max(e2e)
        cf, ce = min(cpu_ms["forward"]), min(cpu_ms["end_to_end"])
        # when other processes keep the cores busy, this process gets about a fixed CPU share, and the
        # ratio tends to CPU(forward) / CPU(end to end) instead of 1
        print(f"CPU per image: forward {cf:.3f} ms, end to end {ce:.3f} ms (all threads); "
              f"CPU-bound ratio {cf / ce:.3f}")
        print(f"pure forward: {f:.1f} img/s")
        print(f"end to end:   {e:.1f} img/s")
        print(f"ratio: {e / f:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
