"""Run summary peak memory: the streamed `write_run_summary` vs the in-memory one it replaced (pandas concat
of every step's ledger), on generated ledgers of N samples x 8 steps, each in a fresh child process.

The ledgers look like a real run's: `ledger/ingest/part-ingest.parquet` (one part, as ingest writes it) and
per-shard parts of 5,000 rows (the mammoth_v1 shard size) for embed, decontam, semdedup, perplexity,
ppl_filter, rephrase and export, with reasons, scores, JSON extras and ~10% drops per filtering step; plus a
1,000-id known-bad list and ingest's source accounting, so every part of the summary runs.

Prints peak RSS (the child's own VmHWM) and seconds of both at each N; the old summary is skipped above
`--old-max` samples (default 1M: at 4M it would need ~7.5 GB on this shared machine). At each N where both ran it
checks that summary.json and counts.parquet are byte-identical. Last line: `ratio: R` = new peak RSS / old
peak RSS at the smallest N (goal: new <= 0.5 GB at every N, flat in N).

    PYTHONPATH=. .venv/bin/python benchmarks/summary_memory.py [--sizes 1000000 4000000] [--old-max 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.foundation.ledger import SCHEMA, step_dir
from core.runs.ledger_stream import ROW_GROUP_ROWS

STEPS = ["ingest", "embed", "decontam", "semdedup", "perplexity", "ppl_filter", "rephrase", "export"]
PART_ROWS = 5_000
# per step: (share dropped, drop reason, share quarantined, quarantine reason, share modified)
PLAN = {
    "ingest": (0.0, "", 0.02, "corrupt_image", 0.0),
    "embed": (0.0, "", 0.001, "decode_error", 0.0),
    "decontam": (0.005, "eval_contamination:docvqa", 0.0, "", 0.0),
    "semdedup": (0.10, "semdedup_eps", 0.0, "", 0.0),
    "perplexity": (0.0, "", 0.001, "no_assistant_turn", 0.0),
    "ppl_filter": (0.10, "ppl_above_p90", 0.0, "", 0.0),
    "rephrase": (0.0, "", 0.002, "placeholder_lost", 0.8),
    "export": (0.0, "", 0.0, "", 0.0),
}


def _strings(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(pa.array(numbers).cast(pa.string()), width, "0"), "")


def generate(run: Path, n: int, seed: int = 0) -> list[str]:
    """Write the 8 steps' ledgers of an n-sample run under `run/ledger/`; returns 1,000 known-bad ids."""
    rng = np.random.default_rng(seed)
    ids = _strings("mammoth-", np.arange(n), 9)
    for step in STEPS:
        p_drop, r_drop, p_q, r_q, p_mod = PLAN[step]
        m = len(ids)
        u = rng.random(m)
        dec = np.where(u < p_q, 3, np.where(u < p_q + p_drop, 2, np.where(u < p_q + p_drop + p_mod, 1, 0)))
        names = np.array(["keep", "modify", "drop", "quarantine"], dtype=object)
        reasons = np.array(["", "", r_drop, r_q], dtype=object)
        shard_no = np.arange(m) // PART_ROWS
        extra = np.full(m, "", dtype=object)
        if step == "ingest":
            extra[dec == 3] = '{"detail": "cannot identify image file", "file": "data.json", "index": 1}'
        elif step == "rephrase":
            extra[dec == 1] = '{"tokens_after": 181, "tokens_before": 312}'
        elif step == "semdedup":
            extra[:] = '{"cluster": 17}'
        table = pa.table({
            "sample_id": ids, "step": pa.array([step] * m), "decision": pa.array(names[dec], pa.string()),
            "reason": pa.array(reasons[dec], pa.string()),
            "score": (pa.array(rng.random(m) * 100) if step in ("perplexity", "ppl_filter", "semdedup")
                      else pa.nulls(m, pa.float64())),
            "shard": _strings("s3://bucket/run/shards/shard-", shard_no, 6),
            "extra": pa.array(extra, pa.string()),
        }, schema=SCHEMA)
        d = step_dir(run, step)
        d.mkdir(parents=True, exist_ok=True)
        if step == "ingest":
            pq.write_table(table, d / "part-ingest.parquet", row_group_size=50_000)  # LedgerWriter's flush size
            kept = int((dec == 0).sum())
            acc = {"source_records": m, "ledger_rows": m, "kept": kept, "quarantined": m - kept,
                   "files": [{"file": "data.json", "source_records": m, "ledger_rows": m}], "balanced": True}
            (d / "source_accounting.json").write_text(json.dumps(acc))
        else:
            for k in range(0, m, PART_ROWS):
                pq.write_table(table.slice(k, PART_ROWS), d / f"part-shard-{k // PART_ROWS:06d}.parquet")
        ids = ids.filter(pa.array(dec <= 1))
    bad = np.sort(rng.choice(n, size=min(1000, n), replace=False))
    return _strings("mammoth-", bad, 9).to_pylist()


# ---------------------------------------------------------------------------------- the old summary (baseline)
def old_write_run_summary(step_dirs, steps, out_dir, known_bad=None):
    """The in-memory summary this project had before streaming (core/runs/summary.py at c4d3101): check_balance
    over pandas frames, every step's ledger read into pandas, concatenated, grouped and written whole."""
    import pandas as pd

    from core.foundation.ledger import PASSING, check_balance, find_step_dir, read_ledger
    from core.runs.summary import check_source_accounting, run_sentence

    balance = check_balance(step_dirs, steps)
    frames = [(s, read_ledger(find_step_dir(step_dirs, s))) for s in steps]
    accounting = (check_source_accounting(find_step_dir(step_dirs, steps[0]), frames[0][1])
                  if steps[0] == "ingest" else None)
    ledger = pd.concat([df for _, df in frames], ignore_index=True) if frames else pd.DataFrame()
    reasons = (ledger[ledger.reason != ""].groupby(["step", "decision", "reason"]).size().rename("count")
               .reset_index()) if len(ledger) else pd.DataFrame(columns=["step", "decision", "reason", "count"])
    last = balance[-1] if balance else None
    summary = {"steps": [b.as_dict() for b in balance], "reasons": reasons.to_dict("records"), "balanced": True,
               "final_samples": int(last.kept + last.modified) if last else 0,
               "source_accounting": accounting, "sentence": run_sentence(balance, accounting)}
    if known_bad is not None:
        bad = set(known_bad)
        rows = []
        for step, df in frames:
            c = df[df["sample_id"].isin(bad)]["decision"].value_counts()
            kept = int(sum(c.get(d, 0) for d in PASSING))
            dropped, quarantined = int(c.get("drop", 0)), int(c.get("quarantine", 0))
            entered = int(c.sum())
            rows.append({"step": step, "entered": entered, "kept": kept, "dropped": dropped,
                         "quarantined": quarantined, "removed": dropped + quarantined,
                         "recall": round((dropped + quarantined) / entered, 4) if entered else None})
        rows[0]["absent"] = len(bad - set(frames[0][1]["sample_id"]))
        summary["known_bad"] = {"n_ids": len(bad), "per_step": rows}
    os.makedirs(out_dir, exist_ok=True)
    pd.DataFrame([b.as_dict() for b in balance]).to_parquet(os.path.join(out_dir, "counts.parquet"), index=False)
    ledger.to_parquet(os.path.join(out_dir, "ledger.parquet"), index=False)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def _child(kind: str, run: str, out: str, bad_file: str) -> None:
    bad = json.loads(Path(bad_file).read_text())
    t0 = time.perf_counter()
    if kind == "old":
        old_write_run_summary([run], STEPS, out, bad)
    else:
        from core.runs.summary import write_run_summary

        write_run_summary([run], STEPS, out, bad)
    sec = time.perf_counter() - t0
    with open("/proc/self/status") as f:  # this process's own high-water RSS since exec
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": sec, "peak_rss_mb": hwm / 1024}))


def measure(kind: str, run: Path, out: Path, bad_file: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one summary in a fresh interpreter. The child reads its own VmHWM: the
    ru_maxrss that wait4 reports would include this parent's RSS (the child is spawned from it before exec)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.run([sys.executable, __file__, "--child", kind, str(run), str(out), str(bad_file)],
                       stdout=subprocess.PIPE, env=env)
    if p.returncode:
        raise SystemExit(f"{kind} summary failed (exit {p.returncode})")
    res = json.loads(p.stdout.decode().strip().splitlines()[-1])
    return res["peak_rss_mb"], res["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--old-max", type=int, default=1_000_000, help="skip the old summary above this many samples")
    ap.add_argument("--workdir", default="", help="where ledgers go (default: a temporary folder, removed)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(*a.child)
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="summary-mem-"))
    first: dict[str, float] = {}
    try:
        for n in a.sizes:
            run = work / f"run-{n}"
            t0 = time.perf_counter()
            bad = generate(run, n)
            bad_file = work / f"bad-{n}.json"
            bad_file.write_text(json.dumps(bad))
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (run / "ledger").rglob("*.parquet"))
            print(f"N={n:,}: {rows:,} ledger rows in {sum(1 for _ in (run / 'ledger').rglob('*.parquet'))} parts "
                  f"(generated in {time.perf_counter() - t0:.0f} s)", flush=True)
            res = {}
            for kind in ("old", "new"):
                if kind == "old" and n > a.old_max:
                    print(f"  old: skipped (N > --old-max {a.old_max:,}; linear in N: 1.9 GB at 1M, ~7.5 GB at 4M)")
                    continue
                rss, sec = measure(kind, run, work / f"out-{kind}-{n}", bad_file)
                res[kind] = rss
                print(f"  {kind}: peak RSS {rss:7.0f} MB   {sec:6.1f} s", flush=True)
            if "old" in res:
                files = ["summary.json", "counts.parquet"]
                if (work / f"out-new-{n}" / "ledger.parquet").exists() and rows <= ROW_GROUP_ROWS:
                    files.append("ledger.parquet")  # one row group: the same bytes as pandas wrote
                same = all((work / f"out-old-{n}" / f).read_bytes() == (work / f"out-new-{n}" / f).read_bytes()
                           for f in files)
                print(f"  {', '.join(files)} byte-identical old vs new: {same}")
                if not same:
                    raise SystemExit("the streamed summary differs from the in-memory one")
            merged = sum(pq.ParquetFile(f).metadata.num_rows for f in (work / f"out-new-{n}" / "ledger").rglob("*.parquet"))
            print(f"  merged ledger dataset (new): {merged:,} rows (== ledger rows: {merged == rows})")
            if merged != rows:
                raise SystemExit("the merged ledger lost rows")
            if not first and "old" in res:
                first = res
            shutil.rmtree(run)
            for kind in res:
                shutil.rmtree(work / f"out-{kind}-{n}")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"ratio: {first['new'] / first['old']:.3f}" if first else "ratio: n/a (the old summary never ran)")


if __name__ == "__main__":
    main()
