"""Does the ablation grid see the planted defects? The demo's ablation (same workflow, same variants, 2 baseline
seeds) at a chosen size, and per variant the pooled early-signal verdict: the paired answer-NLL delta to the
baseline with its 95% interval against the baseline seeds' spread.

    PYTHONPATH=. python benchmarks/ablation_signal.py --n 300 --steps 30            # the demo's size
    PYTHONPATH=. python benchmarks/ablation_signal.py --n 600 --steps 60 --out /tmp/sig600

The planted defects (core/demo/dataset.py `DefectRates`, of n samples): near-duplicate pairs 5%, exact-duplicate
pairs 3%, garbled answers 5%, unrelated "data table" Q&A 5%, verbose answers 5%, 9 corrupt records, plus 2 copies
of each benchmark's eval items. They predict that removing them (ppl@0-90 drops the highest-perplexity 10%;
semdedup@0.1 the most redundant 10%; decontam the eval copies) lowers the answer NLL of clean gold answers.
Last line: `ratio: |delta| / noise` of the variant with the largest significant improvement (0 when none is
significant and outside the noise floor).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

VARIANTS = ["baseline", "semdedup@0.1", "ppl@0-90", "decontam"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="demo samples (the demo uses 300)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per run (the demo uses 30)")
    ap.add_argument("--seeds", type=int, default=2, help="baseline seeds (the noise floor)")
    ap.add_argument("--eval_max_samples", type=int, default=8)
    ap.add_argument("--out", default="", help="work folder (default: a fresh one under TMPDIR)")
    a = ap.parse_args()
    import tempfile

    import pandas as pd

    from core.demo import generate_demo, plant_eval_contamination
    from core.demo.eval_fixtures import write_fixtures

    out = a.out or tempfile.mkdtemp(prefix="ablation_signal-")
    t0 = time.perf_counter()
    write_fixtures(os.path.join(out, "eval_cache"))
    info = generate_demo(os.path.join(out, "data"), n_samples=a.n, seed=0)
    plant_eval_contamination(info.out_dir, os.path.join(out, "eval_cache"), per_benchmark=2)
    ref = generate_demo(os.path.join(out, "reference"), n_samples=300, seed=1, corrupt=False)
    config = ('{"train_config": {"max_steps": %d}, "eval_max_samples": %d, "baseline_seeds": %d}'
              % (a.steps, a.eval_max_samples, a.seeds))
    cmd = ["pyflyte", "--config", "flyte.config", "run", "workflows/ablate.py", "ablate",
           "--source", info.data_json, "--image_root", info.images_dir,
           "--reference_source", ref.data_json, "--reference_image_root", ref.images_dir,
           "--reference_ids", ref.ground_truth, "--variants", str(VARIANTS).replace("'", '"'),
           "--eval_cache", os.path.join(out, "eval_cache"), "--config", config,
           "--output_dir", os.path.join(out, "ablation")]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    p = pd.read_parquet(os.path.join(out, "ablation", "paired.parquet"))
    pooled = p[(p["benchmark"] == "all") & (p["metric"] == "answer_nll")]
    print(f"n={a.n} steps={a.steps} seeds={a.seeds}: ablation in {seconds:.0f} s; pooled answer NLL vs baseline:")
    print(pooled[["variant", "n", "baseline", "value", "delta", "ci_lo", "ci_hi", "p_value", "noise",
                  "verdict"]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))  # fmt: skip
    wins = pooled[pooled["verdict"] == "significant, outside noise: better"]
    best = max((abs(r.delta) / max(r.noise, 1e-12) for r in wins.itertuples()), default=0.0)
    print(f"ratio: {best:.2f}")


if __name__ == "__main__":
    sys.exit(main())
