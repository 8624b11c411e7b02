"""GPU check: how mmcurate's heavy steps run on one GPU, in one short slot, with goals beside each number.

    python benchmarks/gpu_check.py [--out gpu_check.md]          # full sizes, on a CUDA machine (< 8 min)
    python benchmarks/gpu_check.py --smoke [--out ...]           # tiny sizes on CPU (CI: tests/unit/test_gpu_check.py)
    make gpu-check [SMOKE=1]

Runs with only torch, transformers, timm, pyarrow, pandas (plus what they pull in: torchvision, Pillow,
tokenizers, fsspec) and the repository: no open_clip, faiss, ray, flytekit or vllm, and no network. Model
weights are random: throughput does not depend on them (same kernels).

1. SigLIP2-so400m/14 @ 378 image tower in bf16 (timm `vit_so400m_patch14_siglip_378`, the tower open_clip
   wraps for `hf-hub:timm/ViT-SO400M-14-SigLIP2-378`): pure forward img/s; end to end from JPEG bytes with
   the embed step's own decode (`core.io.images.decode_image`, draft decoding) and batch preprocessing
   (`core.steps.embed.preprocess.BatchPreprocess`) on this machine's CPU cores, overlapped with the GPU; their
   ratio; MFU from the FLOPs of one image (torch's FlopCounterMode) and the GPU's dense bf16 peak.
2. Perplexity on a Qwen2-0.5B-shaped decoder (vocab 151,936, random init) in bf16 through the product's
   scorer (`core.steps.perplexity.PerplexityScorer`, length-bucketed batches) vs the naive one-sample loop
   (`naive_scores`): tokens/s, padding waste, speedup; rel. error of the perplexities in fp32.
3. SemDeDup k-means (torch path where faiss is absent) + assignment + pruning (`core.steps.dedup.semdedup`) on
   1M x 1152 clustered vectors on the GPU: achieved FLOP/s of that work vs a same-run fp32 matmul.
4. The eval runner's batched generation (`core.evals.backends.TransformersBackend`) on a small random
   LLaVA: requests/s at batch 1 and batch 16.

Writes the table (markdown) to --out and prints it; exit status 1 if a section raised (its error is in
the table). Last line: `ratio: R` = SigLIP2 end to end / pure forward.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense (no sparsity) peak FLOP/s by GPU name, from the vendor data sheets: bf16 tensor core, fp32 (no TF32).
PEAKS = {"H100 SXM": (989e12, 67e12), "H100 NVL": (835e12, 60e12), "H100 PCIe": (756e12, 51e12),
         "H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.errors = 0

    def add(self, check: str, metric: str, value: str, goal: str = "", ok: bool | None = None) -> None:
        self.rows.append((check, metric, value, goal, "" if ok is None else ("PASS" if ok else "MISS")))
        print(f"  {check} | {metric} | {value} | {goal} {self.rows[-1][4]}", flush=True)

    def markdown(self) -> str:
        head = "| check | metric | value | goal | |\n|---|---|---|---|---|\n"
        return head + "".join("| " + " | ".join(r) + " |\n" for r in self.rows)


def peak_flops(device: str) -> tuple[float, float, str]:
    import torch

    if device != "cuda":
        return math.nan, math.nan, platform.processor() or "cpu"
    name = torch.cuda.get_device_name(0)
    for key, val in PEAKS.items():
        if key in name:
            return val[0], val[1], name
    return math.nan, math.nan, name


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def jpegs(n: int, seed: int = 0, size: tuple[int, int] = (512, 384)) -> list[bytes]:
    """Distinct photo-like JPEGs (smooth gradients, shapes, noise), quality 90."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    w, h = size
    for _ in range(n):
        base = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), h)[:, None, :].repeat(w, 1)
        arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            d.ellipse([x0, y0, x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 160))],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------ 1. SigLIP2
def check_siglip(t: Table, device: str, smoke: bool) -> float:
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision import transforms as T

    from core.io.images import decode_image
    from core.steps.embed.preprocess import BatchPreprocess

    kw = dict(embed_dim=32, depth=1, num_heads=2, img_size=56) if smoke else {}
    label = f"SigLIP2 so400m/14@378 {'bf16' if device == 'cuda' else 'fp32 (CPU smoke: 1 layer, width 32)'}"
    torch.manual_seed(0)
    model = timm.create_model("vit_so400m_patch14_siglip_378", pretrained=False, num_classes=0, **kw)
    side = model.patch_embed.img_size[0]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    batch, iters = (4, 2) if smoke else (256, 8)
    x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as fc:  # with autograd on: its module hooks need grad_fns
        model(x[:1])
    flops_img = fc.get_total_flops()
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync(device)
        fwd = batch * iters / (time.perf_counter() - t0)
    peak_bf16, _, gpu = peak_flops(device)
    mfu = flops_img * fwd / peak_bf16
    t.add(label, "model", f"{params / 1e6:.0f} M params, {flops_img / 1e9:.0f} GFLOP/img, "
          f"batch {batch}, {gpu}")
    t.add(label, "pure forward", f"{fwd:,.0f} img/s", ">= 600 img/s", None if smoke else fwd >= 600)
    t.add(label, "MFU", f"{mfu:.2f}", "~0.5 (600 img/s on H100)", None)

    # end to end: JPEG bytes -> decode (draft) -> resize/normalise (SigLIP: squash resize, mean=std=0.5)
    pre = BatchPreprocess.split(T.Compose([T.Resize((side, side), interpolation=T.InterpolationMode.BICUBIC),
                                           T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]))
    n_img = 16 if smoke else 2048
    data = jpegs(min(n_img, 64))
    data = (data * (n_img // len(data) + 1))[:n_img]
    workers = max(1, os.cpu_count() or 1)

    def prep(b: bytes):
        return pre.image(decode_image(b, draft_side=side))

    with ThreadPoolExecutor(workers) as pool, torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        chunks = [data[i: i + batch] for i in range(0, n_img, batch)]
        pending = [pool.map(prep, c) for c in chunks[:2]]  # decode runs ahead of the model by two batches
        for i in range(len(chunks)):
            items = list(pending[i])
            if i + 2 < len(chunks):
                pending.append(pool.map(prep, chunks[i + 2]))
            xb = pre.batch(items).pin_memory() if device == "cuda" else pre.batch(items)
            model(xb.to(device, dtype=dtype, non_blocking=True))
        sync(device)
        e2e = n_img / (time.perf_counter() - t0)
    ratio = e2e / fwd
    t.add(label, f"end to end (JPEG 512x384, {workers} CPU threads)", f"{e2e:,.0f} img/s")
    t.add(label, "end to end / forward", f"{ratio:.2f}", ">= 0.9", None if smoke else ratio >= 0.9)
    return ratio


# ------------------------------------------------------------------------------------------ 2. perplexity
def check_perplexity(t: Table, device: str, smoke: bool) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.ppl_batched import make_samples
    from core.models.tiny_lm import build_tokenizer
    from core.steps.perplexity import PerplexityConfig, PerplexityScorer, naive_scores

    samples = make_samples(16 if smoke else 256, 0)
    tok = build_tokenizer([s.text("all") for s in samples], vocab_size=1000)
    shape = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=4096) if smoke else
             dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151_936))
    cfg = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    label = f"perplexity Qwen2-0.5B-shaped ({n_params / 1e9:.2f} B, vocab {shape['vocab_size']:,})"
    bt = 2048 if smoke else 16384
    for dtype in ("bfloat16", "float32"):
        model = model.to(dtype=getattr(torch, dtype)).eval()
        pc = PerplexityConfig(model="(in memory)", device=device, dtype=dtype, batch_tokens=bt, max_length=2048)
        sc = PerplexityScorer(pc, tok, model)
        enc, bad = sc.encode(samples)
        assert not bad, bad[:3]
        if dtype == "float32":  # accuracy only: the same samples through both paths in fp32
            sub = enc[: 8 if smoke else 64]
            batched = sc.score_encoded(sub)
            naive = naive_scores(model, sub, device)
            rel = max(abs(math.exp(n) - b.ppl) / math.exp(n) for n, b in zip(naive, batched))
            t.add(label, "max rel. error batched vs naive (fp32)", f"{rel:.1e}", "<= 1e-4", rel <= 1e-4)
            continue
        tokens = sum(len(e.input_ids) for e in enc)
        sc.score_encoded(enc[:8])
        naive_scores(model, enc[:4], device)
        sc.stats = type(sc.stats)()
        sync(device)
        t0 = time.perf_counter()
        sc.score_encoded(enc)
        sync(device)
        tb = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive_scores(model, enc, device)
        sync(device)
        tn = time.perf_counter() - t0
        t.add(label, f"batched bf16 ({len(enc)} samples, {tokens:,} tokens)",
              f"{tokens / tb:,.0f} tokens/s, padding waste {sc.stats.padding_waste:.3f}")
        t.add(label, "naive bf16", f"{tokens / tn:,.0f} tokens/s")
        t.add(label, "speedup batched / naive", f"{tn / tb:.1f}x", ">= 4x", None if smoke else tn / tb >= 4)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ 3. k-means
def check_kmeans(t: Table, device: str, smoke: bool) -> None:
    import torch

    from benchmarks.dedup_scale import kmeans_flops, pairwise_flops
    from core.demo.embeddings import clustered_embeddings
    from core.steps.dedup.config import SemDedupConfig
    from core.steps.dedup.device import _fp32_highest
    from core.steps.dedup.semdedup import cluster_rows, decide_target, kmeans_backend, score_clusters

    n, d, k = (4000, 32, 8) if smoke else (1_000_000, 1152, 100)
    x = clustered_embeddings(n, d, k, seed=0, spread=0.7)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.array([f"s{i:07d}" for i in range(n)])
    cfg = SemDedupConfig(n_clusters=k, target_removal=0.1, kmeans_iters=20, device=device, kmeans_branching=0,
                         chunk_size=4096 if smoke else 16384)
    # same-run matmul: fp32 at full precision, as the product's pruning runs it
    m = 1024 if smoke else 16384
    a = torch.randn(m, d, device=device)
    with _fp32_highest():
        a @ a.T
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a.T
        sync(device)
        mm = 3 * 2 * m * m * d / (time.perf_counter() - t0)
    del a
    sync(device)
    t0 = time.perf_counter()
    _, labels, sims = cluster_rows(x, cfg, device)
    sync(device)
    t_km = time.perf_counter() - t0
    t1 = time.perf_counter()
    sc = score_clusters(x, ids, labels, sims, cfg, device)
    decide_target(sc.m, sc.sample_id, 0.1)
    sync(device)
    t_pw = time.perf_counter() - t1
    sizes = np.bincount(labels, minlength=k)
    work = kmeans_flops(n, k, d, cfg.kmeans_iters, 0) + pairwise_flops(sizes, cfg.chunk_size, d)
    rate = work / (t_km + t_pw)
    label = f"semdedup {n:,} x {d}, k={k} ({kmeans_backend(device)} k-means)"
    t.add(label, "k-means+assign / pairwise+decide", f"{t_km:.2f} s / {t_pw:.2f} s (host arrays in and out)")
    t.add(label, "achieved fp32 FLOP/s vs same-run matmul", f"{rate / 1e12:.2f} / {mm / 1e12:.2f} TFLOP/s = "
          f"{rate / mm:.2f}", ">= 0.5", None if smoke else rate / mm >= 0.5)


# ------------------------------------------------------------------------------------------ 4. eval runner
def check_generation(t: Table, device: str, smoke: bool) -> None:
    import tempfile

    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from evals_doubles import make_tiny_llava

    from core.evals.backends import GenRequest, load_backend

    n, bs = (4, 2) if smoke else (64, 16)
    with tempfile.TemporaryDirectory() as tmp:
        backend = load_backend("transformers", make_tiny_llava(os.path.join(tmp, "ckpt")), device)
        imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs(8, size=(128, 96))]
        reqs = [GenRequest([imgs[i % 8]], f"How many circles are in image {i}?", 16) for i in range(n)]
        backend.generate(reqs[:2])
        rate = {}
        for b in (1, bs):
            sync(device)
            t0 = time.perf_counter()
            for i in range(0, n, b):
                backend.generate(reqs[i: i + b])
            sync(device)
            rate[b] = n / (time.perf_counter() - t0)
        backend.close()
    t.add("eval runner generation (small random LLaVA)", f"batch 1 / batch {bs}",
          f"{rate[1]:.1f} / {rate[bs]:.1f} req/s = {rate[bs] / rate[1]:.1f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (CI)")
    ap.add_argument("--out", default="gpu_check.md")
    ap.add_argument("--only", default="siglip,perplexity,kmeans,generation")
    a = ap.parse_args(argv)
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("no CUDA device: running the smoke mode (tiny sizes on CPU); no GPU number below", flush=True)
        a.smoke = True
    device = "cpu" if a.smoke else "cuda"
    t = Table()
    t0 = time.perf_counter()
    ratio = math.nan
    checks = {"siglip": check_siglip, "perplexity": check_perplexity, "kmeans": check_kmeans,
              "generation": check_generation}
    for name in a.only.split(","):
        s = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            r = checks[name](t, device, a.smoke)
            if name == "siglip":
                ratio = r
        except Exception as e:  # recorded in the table and in the exit status; the other checks still run
            traceback.print_exc()
            t.add(name, "ERROR", f"{type(e).__name__}: {str(e)[:200]}", "", False)
            t.errors += 1
        print(f"   ({time.perf_counter() - s:.1f} s)", flush=True)
    head = (f"# gpu_check ({'smoke, CPU' if a.smoke else 'full'}; torch {torch.__version__}; "
            f"{peak_flops(device)[2]}; {time.perf_counter() - t0:.0f} s)\n\n")
    text = head + t.markdown()
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    print(f"table written to {a.out}")
    print(f"ratio: {ratio:.2f}")
    return 1 if t.errors else 0


if __name__ == "__main__":
    sys.exit(main())
