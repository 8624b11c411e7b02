"""Evaluate every soup of a set of expert checkpoints with the Flyte-free eval runner (a thread pool of `--cap`
workers, each merging its soup from the experts) and print the measured peak of soups and expert copies held.

    PYTHONPATH=. python scripts/mixing_soups_local.py --expert charts=/ckpt/a --expert docs=/ckpt/b \
        --eval_cache demo_out/eval_cache --out /tmp/soups --cap 2 [--heldout_root <prepare_experts output>]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from core.evals.config import EvalConfig
from core.evals.runner import evaluate_checkpoints
from core.mixing.pipeline import heldout_scores
from core.mixing.soups import HoldLog, SoupStore, peak_held
from core.mixing.steps import heldout_dirs, soup_uris


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expert", action="append", required=True, help="domain=checkpoint_dir (repeat)")
    ap.add_argument("--eval_cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cap", type=int, default=2)
    ap.add_argument("--benchmarks", default="countbench,chartqa")
    ap.add_argument("--max_samples", type=int, default=4)
    ap.add_argument("--heldout_root", default="")
    ap.add_argument("--method", default="uniform")
    ap.add_argument("--base", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    experts = dict(e.split("=", 1) for e in args.expert)
    held = heldout_dirs(args.heldout_root) if args.heldout_root else {}
    log = HoldLog()
    store = SoupStore(experts, args.base or None, args.method, log=log,
                      probe=(lambda p: heldout_scores(p, held, "cpu")) if held else None)
    cfg = EvalConfig(args.eval_cache, args.benchmarks.split(","), device="cpu", batch_size=4,
                     max_samples=args.max_samples, concurrency=args.cap)
    uris = soup_uris(sorted(experts))
    t0 = time.time()
    res = evaluate_checkpoints(uris, cfg, args.out, store)
    store.close()
    wall = time.time() - t0
    stats = {"soups": len(uris), "evaluated_ok": int((res.table["status"] == "ok").sum()), "cap": args.cap,
             "peak_soups_held": peak_held(log.rows, "soup"), "peak_experts_held": peak_held(log.rows, "expert"),
             "wall_s": round(wall, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "holds.json"), "w") as f:
        json.dump(log.rows, f)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
