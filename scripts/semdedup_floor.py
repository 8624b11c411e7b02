"""Choose SemDeDup's target-mode floor (`min_similarity`) from the M distribution of a labelled dataset.

Generates the demo (planted exact / near-duplicate pairs, everything else distinct), ingests and embeds it
with an embed preset, computes SemDeDup's M for every image sample, and prints the M quantiles of the
planted copies (the later member of each pair) and of the distinct samples, the eps -> removed-fraction
curve, and the floor that removes no distinct sample on this data (midway between the largest distinct M
and the smallest copy M when they separate, else the 99.5th percentile of distinct M).

    /work/wt/env.sh python scripts/semdedup_floor.py [--n 300] [--preset tiny] [--clusters 8]

Re-run after retraining an embedder: the floor belongs to the embedder, not to the algorithm.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--workdir", default="")
    a = ap.parse_args()

    from core.demo import generate_demo, load_ground_truth
    from core.foundation.configs import preset
    from core.io.ingest import IngestConfig, ingest
    from core.io.wds import list_shards
    from core.steps.dedup.config import SemDedupConfig
    from core.steps.dedup.embeddings import read_embeddings
    from core.steps.dedup.semdedup import removal_curve, semdedup_arrays
    from core.steps.embed import embed_shards
    from core.steps.embed.config import EmbedConfig

    wd = a.workdir or tempfile.mkdtemp(prefix="floor_")
    data = os.path.join(wd, "data")
    generate_demo(data, n_samples=a.n, seed=0, corrupt=False)
    gt = load_ground_truth(data)
    run = os.path.join(wd, "run")
    ingest(IngestConfig(source=f"{data}/data.json", image_root=f"{data}/images", run_dir=run))
    embed_shards(list_shards(f"{run}/shards"), f"{run}/embed", preset(EmbedConfig, a.preset, device="cpu"), use_ray=False)
    es = read_embeddings(f"{run}/embed", "image")
    cfg = SemDedupConfig(n_clusters=a.clusters, eps=0.0, kmeans_iters=20, device="cpu", sweep_subsample=0)
    r = semdedup_arrays(es.ids, es.matrix, cfg)
    m = dict(zip(r.scores.sample_id.tolist(), r.scores.m.astype(np.float64).tolist()))
    copies = {g[1] for g in gt["near_duplicate_groups"] + gt["exact_duplicate_groups"]}
    members = {i for g in gt["near_duplicate_groups"] + gt["exact_duplicate_groups"] for i in g}
    cm = np.array([m[i] for i in copies if i in m and np.isfinite(m[i])])
    dm = np.array([v for i, v in m.items() if i not in members and np.isfinite(v)])
    q = [0, 0.5, 0.9, 0.99, 1.0]
    print(f"embedded image samples: {len(m)}; planted copies with M: {len(cm)}; distinct samples with M: {len(dm)}")
    print("M quantiles", q)
    print("  copies  :", np.round(np.quantile(cm, q), 5).tolist())
    print("  distinct:", np.round(np.quantile(dm, q), 5).tolist())
    eps, frac = removal_curve(r.scores.m)
    print("eps -> removed fraction:", json.dumps({f"{e:.3f}": round(float(f), 3) for e, f in zip(eps, frac)
                                                  if e in (0.0, 0.001, 0.005, 0.01, 0.02) or round(e, 3) in
                                                  (0.05, 0.1, 0.15, 0.2, 0.3)}))
    if cm.min() > dm.max():
        floor = 0.5 * (cm.min() + dm.max())
        how = "midway between the largest distinct M and the smallest copy M"
    else:
        floor = float(np.quantile(dm, 0.995))
        how = "99.5th percentile of distinct M (copies and distinct samples overlap)"
    above_d = float((dm > floor).mean())
    above_c = float((cm > floor).mean())
    print(f"floor: {floor:.5f} ({how}); distinct above it: {above_d:.1%}; copies above it: {above_c:.1%}")


if __name__ == "__main__":
    main()
