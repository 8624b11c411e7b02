"""Smoke step of a container image: run inside `podman build` (the `smoke` stage of containers/<role>.Dockerfile).

It proves that the image's pins are the ones installed, that its stack imports, and that one small real step of the
pipeline runs in it, offline and on CPU (a build has no GPU):

    cpu    demo data (core.demo) -> ingest task -> export task (flytekit local execution), export verified
    gpu    demo data -> ingest -> embed with the tiny open_clip model (CPU) -> SemDedup (faiss k-means + pruning)
    train  demo data -> ingest -> export -> tiny LM -> a few optimizer steps of the mini LLaVA trainer + checkpoint
    vllm   import vllm/flytekit/the rephrase code and check the pins only (vLLM needs a GPU to run)

    python containers/smoke.py ROLE --report /build/smoke-ROLE.json

The report (JSON: role, versions, counts, seconds) is copied into the final image, so an image built by `make images`
exists only if its smoke step passed. Any failure raises (non-zero exit: the build stops).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The project's code: /root in the images (PYTHONPATH), the checkout when run from a working tree.
for root in (Path("/root"), HERE.parent):
    if (root / "core").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
        break

_spec = importlib.util.spec_from_file_location("mmcurate_pins", HERE / "pins.py")
pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pins)

N_DEMO = 48  # demo samples: enough for every planted defect kind (core.demo.MIN_SAMPLES = 40)


def log(msg: str) -> None:
    print(f"smoke: {msg}", flush=True)


def check_pins(role: str) -> dict[str, str]:
    """Every requirement of the role and every lock entry installed is at its pinned version; returns the pins."""
    wanted = {pins.requirement_name(r): r.split("==")[1] for r in pins.role_requirements(role)}
    lock = {pins.requirement_name(r): r.split("==")[1] for r in pins.role_lock(role)}
    installed = {pins.canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    wrong = {n: (v, installed.get(n)) for n, v in wanted.items() if installed.get(n) != v}
    wrong |= {n: (v, installed[n]) for n, v in lock.items() if n in installed and installed[n] != v}
    if wrong:
        raise SystemExit(f"smoke {role}: installed versions differ from the pins (pinned, installed): {wrong}")
    unlocked = sorted(set(installed) - set(lock) - set(wanted) - {"pip", "setuptools", "wheel"})
    log(f"pins ok: {len(wanted)} requirements, {sum(n in installed for n in lock)} locked packages at their pins"
        + (f"; not in the lock: {unlocked}" if unlocked else ""))
    return {n: installed[n] for n in sorted(wanted)}


def demo_dataset(work: Path) -> tuple[str, str]:
    from core.demo import generate_demo

    info = generate_demo(str(work / "demo"), n_samples=N_DEMO, seed=0)
    log(f"demo dataset: {N_DEMO} samples with planted defects -> {work / 'demo'} ({type(info).__name__})")
    return str(work / "demo" / "data.json"), str(work / "demo" / "images")


def ingest_core(work: Path) -> tuple[str, dict]:
    from core.io.ingest import IngestConfig, ingest

    source, images = demo_dataset(work)
    run_dir = str(work / "run")
    res = ingest(IngestConfig(source=source, image_root=images, run_dir=run_dir, shard_max_samples=16))
    summary = res.summary()
    log(f"ingest: {summary}")
    assert summary["kept"] > 0 and summary["quarantined"] > 0, summary  # the demo plants broken samples
    assert summary["kept"] + summary["quarantined"] == summary["records"] == N_DEMO, summary
    return run_dir, summary


def export_core(run_dir: str, out: str) -> dict:
    from core.io.wds import list_shards
    from core.steps.export import ExportConfig, export_curated, verify_export

    manifest = export_curated(list_shards(f"{run_dir}/shards"), run_dir, out, ExportConfig(max_samples=16))
    verified = verify_export(out)
    assert verified["n_samples"] == manifest["n_samples"] > 0, verified
    log(f"export: {manifest['n_samples']} samples in {manifest['n_shards']} shards, verified")
    return manifest


def smoke_cpu(work: Path) -> dict:
    """Ingest and export through the Flyte tasks (local execution), as `pyflyte run` would in this image."""
    from core.io.ingest import IngestOptions
    from core.steps.export import verify_export
    from tasks.export import export_dataset
    from tasks.ingest import ingest_dataset

    source, images = demo_dataset(work)
    run = ingest_dataset(source=source, image_root=images, config=IngestOptions(shard_max_samples=16))
    run_dir = run.dir.download()  # a step task returns StepOut(step, dir)
    from core.foundation.ledger import read_ledger, step_dir

    led = read_ledger(step_dir(run_dir, "ingest"))
    counts = led.decision.value_counts().to_dict()
    log(f"ingest task: {counts} -> {run_dir}")
    assert counts.get("keep", 0) > 0 and counts.get("quarantine", 0) > 0, counts
    exported = export_dataset(run=run)
    out = exported.dir.download()
    manifest = verify_export(out)  # re-reads every shard against manifest.json; raises on a mismatch
    log(f"export task: {manifest['n_samples']} samples in {manifest['n_shards']} shards, verified -> {out}")
    assert manifest["n_samples"] == counts["keep"] > 0, (manifest["n_samples"], counts)
    return {"ingest": counts, "exported_samples": manifest["n_samples"], "shards": manifest["n_shards"]}


def smoke_gpu(work: Path) -> dict:
    import faiss
    import open_clip  # noqa: F401
    import ray  # noqa: F401
    import torch

    assert hasattr(faiss, "StandardGpuResources"), "faiss without GPU support (faiss-cpu installed?)"
    log(f"torch {torch.__version__} (CUDA build {torch.version.cuda}; GPU here: {torch.cuda.is_available()}), "
        f"faiss {faiss.__version__} with GPU indexes")
    from core.io.wds import list_shards
    from core.steps.dedup.config import tiny_dedup_config
    from core.steps.dedup.pipeline import run_semdedup
    from core.steps.embed import embed_shards, tiny_embed_config

    run_dir, ingest_summary = ingest_core(work)
    emb_dir = str(work / "emb")
    cfg = tiny_embed_config(cache_dir=str(work / "embed-cache"), batch_size=8)
    summ = embed_shards(list_shards(f"{run_dir}/shards"), emb_dir, cfg, use_ray=False)
    log(f"embed (tiny open_clip, CPU, in-process worker): {summ.n_kept} samples, {summ.n_images} images, "
        f"{summ.n_quarantined} quarantined")
    assert summ.n_kept > 0 and summ.n_images > 0
    dedup = run_semdedup(emb_dir, str(work / "dedup"), tiny_dedup_config())
    brief = {k: dedup[k] for k in ("n_input", "n_removed", "eps") if k in dedup}
    log(f"semdedup (faiss k-means, CPU): {brief or sorted(dedup)[:12]}")
    return {"ingest": ingest_summary, "embedded": summ.n_kept, "images": summ.n_images, "semdedup": brief}


def smoke_train(work: Path) -> dict:
    import numpy as np
    import torch

    from core.models.tiny_lm import train_tiny_lm
    from core.steps.embed.model import tiny_local_dir
    from core.train.config import tiny_train_config
    from core.train.loop import list_checkpoints, train

    torch.set_num_threads(1)
    run_dir, ingest_summary = ingest_core(work)
    manifest = export_core(run_dir, str(work / "export"))
    rng = np.random.default_rng(0)
    words = ["red", "blue", "square", "circle", "two", "three", "chart", "left", "right", "small"]
    texts = [[{"role": "user", "content": "<image>\n" + " ".join(rng.choice(words, 6))},
              {"role": "assistant", "content": " ".join(rng.choice(words, 5))}] for _ in range(100)]
    lm = train_tiny_lm(texts, work / "lm", vocab_size=400, steps=10, hidden=64)
    vision = tiny_local_dir(work / "vision")
    cfg = tiny_train_config(str(work / "train"), f"local-dir:{vision}", lm, epochs=1, max_steps=4, val_size=4,
                            val_every_n_steps=2, device="cpu")
    res = train(str(work / "export" / "shards"), cfg)
    ckpts = list_checkpoints(cfg.output_dir)
    metrics = [json.loads(line) for line in Path(cfg.output_dir, "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    log(f"train (mini LLaVA, CPU): {len(losses)} logged steps, losses {[round(x, 3) for x in losses]}, "
        f"checkpoints {[str(p.name) for _, p in ckpts]}, result {type(res).__name__}")
    assert losses and all(np.isfinite(losses)) and ckpts
    return {"ingest": ingest_summary, "exported": manifest["n_samples"], "losses": losses, "checkpoints": len(ckpts)}


def smoke_vllm(work: Path) -> dict:
    import flytekit
    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams  # noqa: F401  (what core/steps/rephrase/generate.py and core/evals use)

    import tasks.evals  # noqa: F401  (the task modules this image runs)
    import tasks.rephrase  # noqa: F401
    from core.steps.rephrase.generate import VLLMGenerator  # noqa: F401

    params = SamplingParams(temperature=0.0, max_tokens=16, seed=0)
    log(f"vllm {vllm.__version__} (torch {torch.__version__}), transformers {transformers.__version__}, "
        f"flytekit {flytekit.__version__}: imported with tasks.rephrase/tasks.evals, SamplingParams(max_tokens="
        f"{params.max_tokens}); no GPU in a build, so no engine is started")
    return {"vllm": vllm.__version__, "torch": torch.__version__}


SMOKES = {"cpu": smoke_cpu, "gpu": smoke_gpu, "train": smoke_train, "vllm": smoke_vllm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=sorted(SMOKES))
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temporary one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network at run time, in the image as in tests
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    versions = check_pins(args.role)
    with tempfile.TemporaryDirectory(prefix=f"smoke-{args.role}-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = SMOKES[args.role](work)
    seconds = round(time.perf_counter() - t0, 1)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps({"role": args.role, "ok": True, "seconds": seconds, "result": result,
                                       "pins": versions}, indent=1, default=str) + "\n")
    log(f"{args.role} OK in {seconds} s -> {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
