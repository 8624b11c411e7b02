"""Does the embedded tiny model carry signal? Demo semdedup and decontamination, trained vs random weights.

One command: generates the demo as `make demo` does (seed 0, planted duplicates, eval copies planted from
the fixture eval cache), ingests it, then for the tiny open_clip model with its trained weights and with
its random init (same architecture, same run): embeds, decontaminates against the embedded eval sets,
and runs semdedup with the demo preset (`tiny_dedup_config`) on the samples decontamination kept.

Printed per model: semdedup precision (removed ids that belong to a planted duplicate group) and recall
(planted groups with a member removed), and decontamination precision/recall at the production threshold
(0.95, SigLIP2's production value), 0.98 (the tiny preset) and 0.9999 (the old random-weight threshold), plus the score gap between
the lowest planted eval copy and the highest other training sample. Semdedup runs on what decontamination
at the model's preset threshold kept (random: 0.9999; trained: `tiny_decontam_config()`).

    python benchmarks/demo_embed_quality.py [--n 300] [--work .state/bench_embed_quality]

Last line: `ratio: R` = semdedup precision trained / random.
Timing of the first training (once per machine) is printed; later runs reuse the cached weights.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.demo import generate_demo, load_ground_truth, plant_eval_contamination
from core.demo.eval_fixtures import write_fixtures
from core.evals.eval_shards import eval_embedding_sets, write_eval_shards
from core.foundation.ledger import read_ledger, step_dir
from core.foundation.step import Passing
from core.io.ingest import IngestConfig, ingest
from core.io.wds import list_shards
from core.steps.dedup.config import DecontamConfig, tiny_decontam_config, tiny_dedup_config
from core.steps.dedup.mining import decontaminate
from core.steps.dedup.pipeline import run_semdedup
from core.steps.embed import embed_shards, tiny_embed_config
from core.steps.embed.model import RANDOM_INIT

BENCHES = ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"]


def evaluate(run: Path, ev: Path, gt: dict, pretrained: str | None, cache: str, preset_threshold: float) -> dict:
    cfg = tiny_embed_config(cache_dir=cache, pretrained=pretrained, what="image", batch_size=64)
    shutil.rmtree(run / "embed", ignore_errors=True)
    shutil.rmtree(step_dir(run, "embed"), ignore_errors=True)
    shutil.rmtree(ev / "embed", ignore_errors=True)
    shutil.rmtree(step_dir(ev, "embed"), ignore_errors=True)
    t0 = time.perf_counter()
    embed_shards(list_shards(f"{run}/shards"), str(run / "embed"), cfg, use_ray=False)  # ledger: <run>/ledger/embed
    embed_shards(list_shards(f"{ev}/shards"), str(ev / "embed"), cfg, use_ray=False)
    t_embed = time.perf_counter() - t0
    sets = eval_embedding_sets(str(ev))
    copies = set(gt.get("eval_contamination", {}))
    out: dict = {"embed_s": round(t_embed, 1)}
    for thr in (0.95, 0.98, 0.9999):
        dc = run / f"decontam_{thr}"
        shutil.rmtree(dc, ignore_errors=True)
        decontaminate(str(run / "embed"), str(dc), sets, DecontamConfig(threshold=thr, k=5, device="cpu"),
                      Passing.read(run, "embed"))
        led = read_ledger(step_dir(dc, "decontam"))
        dropped = set(led[led.decision == "drop"].sample_id)
        out[f"decontam@{thr}"] = (f"dropped {len(dropped)}, copies caught {len(dropped & copies)}/{len(copies)}, "
                                  f"precision {len(dropped & copies) / max(len(dropped), 1):.3f}")
        if thr == 0.95:
            scored = led[led.score.notna()]
            out["min_copy_score"] = round(float(scored[scored.sample_id.isin(copies)].score.min()), 4)
            out["max_other_score"] = round(float(scored[~scored.sample_id.isin(copies)].score.max()), 4)
    # semdedup sees what decontamination at the model's preset threshold kept, as in the demo workflow
    keep_dir = run / f"decontam_{preset_threshold}"
    if not keep_dir.exists():
        decontaminate(str(run / "embed"), str(keep_dir), sets,
                      DecontamConfig(threshold=preset_threshold, k=5, device="cpu"), Passing.read(run, "embed"))
    sd = run / "semdedup"
    shutil.rmtree(sd, ignore_errors=True)
    cfg_sd = tiny_dedup_config()
    cfg_sd.device = "cpu"
    s = run_semdedup(str(run / "embed"), str(sd), cfg_sd, Passing.read(keep_dir, "decontam"))
    led = read_ledger(step_dir(sd, "semdedup"))
    removed = set(led[led.decision == "drop"].sample_id)
    groups = [tuple(g) for g in gt["near_duplicate_groups"] + gt["exact_duplicate_groups"]]
    members = {i for g in groups for i in g}
    found = sum(1 for g in groups if set(g) & removed)
    near = [tuple(g) for g in gt["near_duplicate_groups"]]
    out.update(semdedup_removed=len(removed), groups_found=f"{found}/{len(groups)}",
               near_found=f"{sum(1 for g in near if set(g) & removed)}/{len(near)}",
               recall=round(found / len(groups), 3), precision=round(len(removed & members) / max(len(removed), 1), 3),
               outside_groups=len(removed - members), eps=round(float(s["eps"]), 4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--work", default=".state/bench_embed_quality")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    write_fixtures(str(work / "eval_cache"))
    generate_demo(str(work / "data"), n_samples=a.n, seed=0)
    plant_eval_contamination(str(work / "data"), str(work / "eval_cache"), per_benchmark=2)  # as `make demo`
    gt = load_ground_truth(str(work / "data"))
    run = work / "run"
    ingest(IngestConfig(source=str(work / "data" / "data.json"), image_root=str(work / "data" / "images"),
                        run_dir=str(run)))
    ev = work / "evals"
    write_eval_shards(str(work / "eval_cache"), BENCHES, str(ev))
    cache = str(work / "models")
    t0 = time.perf_counter()
    from core.steps.embed.model import tiny_checkpoint

    tiny_checkpoint(Path(cache))  # trains once per machine (shared cache), then copies
    print(f"trained tiny model ready in {time.perf_counter() - t0:.1f} s (0 when cached)")
    rows = {"random (decontam 0.9999)": evaluate(run, ev, gt, RANDOM_INIT, cache, 0.9999),
            f"trained (decontam {tiny_decontam_config().threshold})": evaluate(run, ev, gt, None, cache,
                                                                              tiny_decontam_config().threshold)}
    table = pd.DataFrame(rows)
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        print(table.to_string())
    r, t = rows.values()
    ratio = t["precision"] / max(r["precision"], 1e-9)
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
