"""Claim: the capped eval runner holds at most `cap` checkpoints on local disk, where an uncapped fan-out
holds all of them (the 10 x 12 GB incident). Measures peak local checkpoint bytes with cap=2 against
cap=N (every checkpoint in parallel, the old behaviour) on the same checkpoints, same fixtures.

    PYTHONPATH=. .venv/bin/python benchmarks/evals_peak_disk.py [--n 10] [--mb 8]

Checkpoints are a tiny local HF LLaVA (real transformers backend, CPU) padded with an `extra.bin` of --mb MB
so the copy is a measurable size. Last line: `ratio: <peak bytes capped / peak bytes uncapped>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from core.demo.eval_fixtures import write_fixtures  # noqa: E402
from core.evals.checkpoints import CheckpointStore  # noqa: E402
from core.evals.config import tiny_eval_config  # noqa: E402
from core.evals.runner import evaluate_checkpoints  # noqa: E402


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


class MeteredStore(CheckpointStore):
    """The real fsspec download/delete, metering bytes and checkpoints held at once."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.held = self.peak = self.held_n = self.peak_n = 0

    def fetch(self, uri):
        local = super().fetch(uri)
        with self.lock:
            self.held += dir_bytes(local)
            self.held_n += 1
            self.peak, self.peak_n = max(self.peak, self.held), max(self.peak_n, self.held_n)
        return local

    def release(self, local):
        size = dir_bytes(local)
        super().release(local)
        with self.lock:
            self.held -= size
            self.held_n -= 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10, help="checkpoints")
    ap.add_argument("--mb", type=int, default=8, help="padding per checkpoint (MB)")
    ap.add_argument("--cap", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from evals_doubles import make_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_llava(os.path.join(tmp, "base"))
        with open(os.path.join(base, "extra.bin"), "wb") as f:
            f.write(os.urandom(args.mb << 20))
        ckpts = []
        for e in range(1, args.n + 1):
            d = os.path.join(tmp, "ckpts", f"epoch_{e}")
            shutil.copytree(base, d)
            ckpts.append(d)
        cache = os.path.join(tmp, "cache")
        write_fixtures(cache, defects=False)
        cfg = tiny_eval_config(cache)
        cfg.device, cfg.benchmarks = "cpu", ["countbench", "chartqa", "realworldqa"]
        rows = {}
        for label, cap in (("uncapped (baseline)", args.n), (f"cap={args.cap}", args.cap)):
            cfg.concurrency = cap
            store = MeteredStore()
            t0 = time.perf_counter()
            res = evaluate_checkpoints(ckpts, cfg, os.path.join(tmp, f"out_{cap}"), store=store)
            dt = time.perf_counter() - t0
            assert (res.table["status"] == "ok").all(), res.table
            rows[label] = store.peak
            print(f"{label:22s} peak held: {store.peak_n:2d} checkpoints, {store.peak / 1e6:7.1f} MB; "
                  f"wall {dt:5.1f}s; records {len(res.records)}")  # fmt: skip
        print(f"checkpoint size {dir_bytes(ckpts[0]) / 1e6:.1f} MB x {args.n}")
        print(f"ratio: {rows[f'cap={args.cap}'] / rows['uncapped (baseline)']:.2f}")


if __name__ == "__main__":
    main()
