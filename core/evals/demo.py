"""Eval demo: write the benchmark fixtures, evaluate the checkpoints under a prefix with cap 2, write the
results table, records and the HTML report.

    PYTHONPATH=. python -m core.evals.demo --checkpoints demo_out/train/checkpoints --out demo_out/evals

The checkpoints are the built-in trainer's (backend auto -> mini_llava) or HF VLM directories.
"""

from __future__ import annotations

import argparse
import logging
import os

from core.demo.eval_fixtures import write_fixtures
from core.evals.checkpoints import list_checkpoints
from core.evals.config import tiny_eval_config
from core.evals.report import eval_report_html
from core.evals.results import EvalResults
from core.evals.runner import evaluate_checkpoints


def run_eval_demo(checkpoints_prefix: str, out_dir: str, cap: int = 2, backend: str = "auto") -> EvalResults:
    """Fixtures -> `<out_dir>/cache`; evaluate every checkpoint under the prefix (cap `cap`) -> `<out_dir>`."""
    cache = os.path.join(out_dir, "cache")
    write_fixtures(cache)
    ckpts = list_checkpoints(checkpoints_prefix)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint directories under {checkpoints_prefix}")
    cfg = tiny_eval_config(cache)
    cfg.concurrency, cfg.backend = cap, backend
    res = evaluate_checkpoints(ckpts, cfg, out_dir)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(eval_report_html(res.summary, res.table, res.records))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", required=True, help="prefix holding one directory per checkpoint")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--cap", type=int, default=2, help="checkpoints evaluated (held) at once")
    ap.add_argument("--backend", default="auto", help="auto | mini_llava | transformers | vllm")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run_eval_demo(args.checkpoints, args.out, args.cap, args.backend)
    cols = [c for c in res.table.columns if c not in ("checkpoint", "error")]
    print(res.table[cols].to_string(index=False))
    print(f"records: {len(res.records)}  failed checkpoints: {len(res.failed_checkpoints)}  report: {args.out}/report.html")


if __name__ == "__main__":
    main()
