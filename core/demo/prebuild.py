"""Build the demo's project-made tiny models into the machine's shared cache, ahead of `make demo`.

    python -m core.demo.prebuild [--work DIR]

The demo trains three small models of its own, each deterministic and cached per machine by its recipe
(MMCURATE_CACHE or ~/.cache/mmcurate): the tiny embed ViT (`core.steps.embed.tiny_train.ensure_tiny_vit`), the
perplexity reference LM (trained on the clean samples of the seed-1 reference set) and the rephrase LM (trained
on the conversations of the seed-0 demo set), both through `core.models.tiny_lm.ensure_tiny_lm`. Whichever
process needs a model first trains it; this entry point does it at setup time instead, so the demo itself only
copies them (about 40 CPU-seconds saved per demo on an idle 2-core machine, scripts/demo.sh).

It regenerates the demo's data exactly as scripts/demo.sh does (same generator, seeds, sizes) in a scratch
folder, ingests it with the ingest task's defaults, and calls the same functions the tasks call with the
same arguments, so the recipe keys match. Should a task's arguments drift from the ones named here, the demo
still gives the same results: its models then miss the cache and are trained at run time (slower, never
different), and the demo log shows `tiny_lm trained` instead of `tiny_lm: reusing`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

# What scripts/demo.sh generates and what the tasks pass (tasks/perplexity.py train_reference_lm defaults,
# CurateConfig/AblateConfig lm_steps and ingest_config of the demo presets).
DEMO_N, DEMO_SEED, REFERENCE_N, REFERENCE_SEED = 300, 0, 300, 1
REFERENCE_LM_PARAMS = {"vocab_size": 2000, "seed": 0}


def prebuild(work: str | os.PathLike) -> dict[str, float]:
    """Generate the demo data under `work`, then build (or find) the three tiny models; seconds per model."""
    from core.demo.dataset import generate_demo, plant_eval_contamination
    from core.demo.eval_fixtures import write_fixtures
    from core.foundation.configs import preset
    from core.io.ingest import ingest
    from core.io.wds import iter_samples, list_shards
    from core.runs.config import CurateConfig
    from core.steps.embed.config import tiny_embed_config
    from core.steps.embed.model import resolve_weights
    from core.steps.perplexity.reference import load_id_list, train_reference_lm
    from core.steps.rephrase.tiny_model import train_demo_model

    w = Path(work)
    cfg = preset(CurateConfig, "demo")
    took: dict[str, float] = {}

    t0 = time.time()
    resolve_weights(tiny_embed_config())  # trains the tiny ViT into the shared cache when it is missing
    took["tiny_vit"] = time.time() - t0

    write_fixtures(str(w / "eval_cache"))
    generate_demo(str(w / "data"), n_samples=DEMO_N, seed=DEMO_SEED, corrupt=True)
    plant_eval_contamination(str(w / "data"), str(w / "eval_cache"), per_benchmark=2)
    generate_demo(str(w / "reference"), n_samples=REFERENCE_N, seed=REFERENCE_SEED, corrupt=False)
    runs = {}
    for name in ("data", "reference"):
        runs[name] = w / f"ingest_{name}"
        ingest(cfg.ingest_config.ingest_config(str(w / name / "data.json"), str(w / name / "images"), str(runs[name])))

    t0 = time.time()
    ids = load_id_list(w / "reference" / "ground_truth.json", "clean")
    train_reference_lm(list_shards(f"{runs['reference']}/shards"), w / "reference_lm", ids,
                       steps=cfg.lm_steps, **REFERENCE_LM_PARAMS)
    took["reference_lm"] = time.time() - t0

    t0 = time.time()
    samples = iter_samples(list_shards(f"{runs['data']}/shards"), load_images=False, verify_images=False)
    train_demo_model(samples, w / "rephrase_lm")
    took["rephrase_lm"] = time.time() - t0
    return took


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one, removed afterwards)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    work = a.work or tempfile.mkdtemp(prefix="mmc-prebuild-")
    try:
        took = prebuild(work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print("demo models ready: " + ", ".join(f"{k} {v:.1f}s" for k, v in took.items()))


if __name__ == "__main__":
    main()
