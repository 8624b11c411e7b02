"""Does the uniform soup of domain experts rank data mixtures like training on them? Spearman between the soup
proxy and the trained mixture on held-out answer NLL, with a bootstrap interval over mixtures, on the tiny CPU
models (protocol: core/mixing/proxy.py).

    PYTHONPATH=. python benchmarks/mixing_proxy.py [--steps 24] [--mixtures 12] [--reseed] [--out DIR]

One run: demo data, a shared base, one expert per domain and 12 mixtures of >= 2 domains (drawn by seed; `--mixtures 0`: all) trained from that
base with the same compute (steps x batch), the uniform soup of each mixture's experts; every model scored on
every domain's held-out answers. Printed: per mixture the trained and soup scores, Spearman with its 95%
interval for the soup, for the mean of the experts' own scores (a proxy without merging, measured in the same
run) and, with `--reseed`, for the same mixtures trained with another data-order seed (the ceiling); per-domain
correlations; wall time per phase. Last line: `ratio: <Spearman(soup, trained)>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.mixing.proxy import (  # noqa: E402
    DEMO_DOMAINS,
    ProxyCheckConfig,
    overall,
    proxy_mixing_config,
    run_proxy_check,
)


def _fmt(s: dict) -> str:
    return f"{s['rho']:+.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}] (n={s['n']}, p={s['p_value']:.2g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=800, help="demo records")
    ap.add_argument("--domains", default=",".join(DEMO_DOMAINS))
    ap.add_argument("--steps", type=int, default=24, help="steps per expert and per mixture")
    ap.add_argument("--base_steps", type=int, default=20)
    ap.add_argument("--lm_steps", type=int, default=300)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                    help="experts' and mixtures' lr schedule: constant, or cosine decay to 0 over the plan's steps "
                         "(the final iterate then carries less of the last batches' SGD noise)")
    ap.add_argument("--heldout", type=int, default=16, help="held-out samples per domain")
    ap.add_argument("--mixtures", type=int, default=12, help="mixtures of >= 2 domains to train, drawn by seed (0: all)")
    ap.add_argument("--compute", choices=("expert", "sum"), default="expert",
                    help="a mixture's steps: one expert's, or the soup's total (|S| x steps)")
    ap.add_argument("--unbalanced", action="store_true", help="keep each domain's full training set")
    ap.add_argument("--reseed", action="store_true", help="also train every mixture with another seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="", help="work folder (default: a temporary one, deleted)")
    args = ap.parse_args()

    mc = proxy_mixing_config(budget_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             lr_schedule=args.lr_schedule,
                             heldout_per_domain=args.heldout, mixture_compute=args.compute,
                             balance_domains=not args.unbalanced, seed=args.seed)
    cfg = ProxyCheckConfig(mixing=mc, n_samples=args.samples, domains=tuple(args.domains.split(",")),
                           lm_steps=args.lm_steps, base_steps=args.base_steps, n_mixtures=args.mixtures,
                           reseed=args.reseed, threads=args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixing_proxy-") as tmp:
        work = args.out or tmp
        check = run_proxy_check(cfg, work, log=lambda m: print(m, flush=True))
        Path(work, "proxy_check.json").write_text(check.to_json())
    wall = time.perf_counter() - t0

    print(f"\nsettings: {args.samples} samples, domains {check.domains} (train {check.sizes}, held out "
          f"{check.heldout_sizes}), base {args.base_steps} steps, {args.steps} steps x {args.batch_size} per expert "
          f"and per mixture ({args.compute} compute), lr {args.lr} {args.lr_schedule}, balanced {not args.unbalanced}, "
          f"seed {args.seed}, "
          f"{len(check.rows)} mixtures, {args.threads} torch thread(s)")
    gains = check.config["expert_self_gain"]
    print(f"base overall {check.config['base_overall']:.4f}; expert gain over the base on its own domain "
          f"(nats/token, > 0: it learned its domain): " + ", ".join(f"{d} {g:+.3f}" for d, g in gains.items()))
    print(f"{'mixture':<36} {'trained':>9} {'soup':>9} {'experts':>9}" + (f" {'reseed':>9}" if args.reseed else ""))
    for r in sorted(check.rows, key=lambda r: -overall(r["trained"])):
        line = f"{r['subset']:<36} {overall(r['trained']):>9.4f} {overall(r['soup']):>9.4f} " \
               f"{overall(r['experts_mean']):>9.4f}"
        print(line + (f" {overall(r['reseeded']):>9.4f}" if args.reseed else ""))
    st = check.stats
    print("\nSpearman vs trained mixture, overall held-out answer NLL (95% percentile bootstrap over mixtures):")
    for name, label in (("soup", "uniform soup (the proxy)"), ("experts_mean", "mean of expert scores (no merge)"),
                        ("n_domains", "number of domains (null proxy)"),
                        ("reseeded", "same mixtures, other seed (ceiling)")):
        if name in st:
            print(f"  {label:<38} {_fmt(st[name])}")
    if "soup@seed_mean" in st:
        print("Spearman vs the mean of the two trainings (half the data-order noise variance in the reference):")
        print(f"  {'uniform soup':<38} {_fmt(st['soup@seed_mean'])}")
        print(f"  {'mean of expert scores (no merge)':<38} {_fmt(st['experts_mean@seed_mean'])}")
    print("per domain (soup):")
    for d in check.domains:
        print(f"  nll_{d:<34} {_fmt(st['soup:nll_' + d])}")
    print(f"wall time: {wall:.0f} s; phases {json.dumps(check.seconds)}")
    s = st["soup"]
    print(f"interval: [{s['lo']:.3f}, {s['hi']:.3f}]")
    print(f"ratio: {s['rho']:.3f}")


if __name__ == "__main__":
    main()
