"""Scale benchmark of the per-shard fan-out (core/runs/fanout.py): each per-sample step with 1 worker and with 2.

Generates N demo samples (core/demo), ingests them into shards of `--shard-samples`, then runs every per-sample
step through `run_sharded` twice, on the same inputs, into fresh folders: `workers=1` (in-process, the step's
own `run`) and `workers=2` (a local Ray with 2 CPUs, a pool of 2 one-CPU actors, groups of `--group-size`
shards). Torch/OpenMP threads are 1 per worker in both arms, and each arm is pinned to as many cores as it has
workers (`os.sched_setaffinity`, inherited by Ray's processes and the actors; `--no-pin` to leave them free): a
worker is one core, so a step whose single process already spreads over more than one core (embed's decode and
prefetch threads, ingest's image readers) is not credited with the fan-out's gain, nor the fan-out with it.

Steps: ingest (partitioned: `ingest` with `partition_records = --shard-samples`, its `IngestStep` units over the
same fan-out, into `w1/ingest` and `w2/ingest`, from the generated data.json; the data for the other steps is
ingested once, in one pass), embed (tiny preset), perplexity (the project's tiny LM, trained here on 300
samples), export (the project's partitioned export, `partition_shards=1`: one unit per input shard, its reduce
writes the manifest and card), decontam scoring (embeddings of the 1-worker embed arm; eval set = the first
files holding `--eval-items` embeddings, 10,000 by default: about the size of the default decontam benchmarks,
and the search cost per sample grows with it), rephrase (tiny preset, the same tiny LM; `--rephrase-shards K`
runs it on the first K shards only: it costs ~20 ms of CPU per sample).

Each arm runs in a child process; its time runs from the child's first import to the end of `run_sharded`,
less the Ray start-up (`import ray` and `ray.init`, printed on its own: on a cluster Ray is up before the step,
and a Flyte Ray task has imported and connected it before its body): the driver's imports (torch only for the
steps that use it: embed, perplexity, rephrase),
starting the actors, their imports and model loads, the work, the reduce. Peak RSS is the largest summed RSS of the child's process tree (driver, Ray's own processes, actors),
sampled every 0.1 s from /proc. The two arms' ledgers are compared (`same`).

    PYTHONPATH=. .venv/bin/python benchmarks/scale_curate.py --samples 2000

`--repeat R` runs each arm R times, interleaved (1w, 2w, 1w, 2w, ...), each into a fresh folder, and compares the
fastest run of each arm (the host is shared: a slow spell adds to a run, never takes away); every run's time
and the efficiency of each pair (and their median) are printed too. A short step repeats its pair beyond R, up to
`--max-repeat` pairs, until each arm has run `--min-arm-seconds` (60) in all, as timeit's autorange does: the
fastest of three runs of 10 s is still at the mercy of one slow minute of the host; a step of minutes keeps R.

Last line: `ratio: E`, E = the lowest parallel efficiency (speedup / 2) among the steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

STEPS = ("ingest", "embed", "perplexity", "export", "decontam", "rephrase")
LM_STEPS = ("perplexity", "rephrase")  # the steps that need the tiny LM trained by `prepare`
TORCH_STEPS = ("embed", "perplexity", "rephrase")  # the steps whose work imports torch (the others never do)
OWN_RAY_TMPDIR = f"/tmp/mmc-scale-{os.getpid()}"  # short: Ray's socket paths under it are length-capped


# ---- the steps, as StepSpecs --------------------------------------------------------------------------
def spec_and_units(step: str, root: Path, out: Path, eval_items: int = 10_000, rephrase_shards: int = 0):
    """(StepSpec, unit URLs, number of input samples) of `step` writing into `out`."""
    from core.foundation.step import Passing, shards_of
    from core.runs.fanout import StepSpec

    run = root / "run"
    shards = shards_of(run)
    prev = Passing.read(run, "ingest") if step != "decontam" else None  # decontam's input is embed's output
    if step == "embed":
        from core.steps.embed.config import tiny_embed_config
        from core.steps.embed.pipeline import EmbedStep

        cfg = tiny_embed_config(cpus_per_actor=1, decode_workers=1)
        return StepSpec(EmbedStep, (str(out / "embed"), cfg), {"prev": prev}), shards, len(prev)
    if step == "perplexity":
        from core.steps.perplexity.config import tiny_perplexity_config
        from core.steps.perplexity.pipeline import PerplexityStep

        return StepSpec(PerplexityStep, (out, tiny_perplexity_config(str(root / "lm"))), {"prev": prev}), shards, len(prev)
    if step == "export":  # the project's partitioned export, one unit per input shard (its reduce: manifest, card)
        from core.steps.export import ExportConfig, export_plan

        spec, units = export_plan(shards, str(run), str(out / "export"),
                                  ExportConfig(steps=["ingest"], partition_shards=1))
        return spec, units, len(prev)
    if step == "decontam":
        from core.steps.dedup.config import tiny_decontam_config
        from core.steps.dedup.mining import DecontamStep

        src = root / "w1" / "embed"  # the 1-worker arm's embeddings: the same inputs for both arms
        files = sorted(str(p) for p in (src / "embed").glob("*.parquet"))
        prev = Passing.read(src, "embed")
        # the eval set: the first files holding >= eval_items embeddings (a stand-in of the size of the default
        # decontam benchmarks; the search cost per sample grows with it), at most half the files
        per_file = max(1, len(prev) // max(1, len(files)))
        k = max(1, min(len(files) // 2, -(-eval_items // per_file)))
        return (StepSpec(DecontamStep, (out, {"bench": files[:k]}, tiny_decontam_config()), {"prev": prev}), files,
                len(prev))
    if step == "rephrase":
        from core.io.wds import shard_name
        from core.steps.rephrase.config import tiny_rephrase_config
        from core.steps.rephrase.step import RephraseStep

        lm = str(root / "lm")
        if rephrase_shards:  # the first shards only (rephrase costs ~20 ms of CPU per sample with the tiny LM)
            shards = shards[:rephrase_shards]
            names = {shard_name(u) for u in shards}
            prev = Passing(prev.step, {k: v for k, v in prev.by_shard.items() if k in names})
        return StepSpec(RephraseStep, (out, tiny_rephrase_config(lm, lm)), {"prev": prev}), shards, len(prev)
    raise ValueError(step)


def ingest_arm(workers: int, root: Path, group_size: int, shard_samples: int):
    """Partitioned ingest of the generated data.json into `w<workers>/ingest`: (units, records, counts)."""
    from core.foundation.ledger import step_dir
    from core.io.ingest import IngestConfig, ingest, read_source_accounting
    from core.runs.fanout import FanOut

    data = root / "data"
    cfg = IngestConfig(str(data / "data.json"), str(data / "images"), str(root / f"w{workers}" / "ingest"),
                       shard_max_samples=shard_samples, partition_records=shard_samples,
                       fanout=FanOut(workers=workers, group_size=group_size))
    res = ingest(cfg, progress_every=0)
    units = len(read_source_accounting(step_dir(cfg.run_dir, "ingest"))["partitions"])
    return units, res.n_records, {"keep": res.n_kept, "quarantine": res.n_quarantined}


# ---- one arm, in a child process ----------------------------------------------------------------------
def arm(step: str, workers: int, root: Path, group_size: int, shard_samples: int = 250, eval_items: int = 10_000,
        rephrase_shards: int = 0) -> None:
    t_start = time.perf_counter()  # both arms pay their imports (torch, the step's modules) inside the time
    from core.runs.fanout import limit_threads

    limit_threads(1)  # before torch is imported: 1 thread in this process as in each actor
    if step in TORCH_STEPS:  # a step without torch (ingest, export, decontam) never imports it, as its task
        import torch

        torch.set_num_threads(1)
    from core.runs.fanout import run_sharded

    out = root / f"w{workers}" / step
    if step != "ingest":
        spec, urls, n = spec_and_units(step, root, out, eval_items, rephrase_shards)
    ray_s = 0.0
    if workers > 1:  # a Flyte Ray task imports Ray and connects before its body: both are the start-up
        t = time.perf_counter()
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        ray_s = time.perf_counter() - t
    started: list[float] = []  # how long the actors took to start (process, imports), from the fan-out's log
    phases: dict[str, float] = {}  # the 2-worker driver's timeline: pool and reduce (from the fan-out's log)

    class Started(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "actors_ready_s"):
                started.append(record.actors_ready_s)
            for k in ("pool_s", "reduce_s"):
                if hasattr(record, k):
                    phases[k] = getattr(record, k)

    fan_log = logging.getLogger("core.runs.fanout")
    fan_log.setLevel(logging.INFO)
    fan_log.addHandler(Started())
    if step == "ingest":
        units, n, counts = ingest_arm(workers, root, group_size, shard_samples)
    else:
        s = run_sharded(spec, urls, workers=workers, group_size=group_size)
        units, counts = len(s.done), s.counts
    wall = time.perf_counter() - t_start - ray_s  # Ray start-up is not the step's: a cluster has Ray up already
    before = wall - phases.get("pool_s", 0.0) - phases.get("reduce_s", 0.0)  # imports, the step's inputs, stamp
    print(json.dumps({"step": step, "workers": workers, "n": n, "units": units, "seconds": wall,
                      "ray_start_s": ray_s, "actors_ready_s": sum(started), "counts": counts,
                      "phases": {"before_pool_s": before, **phases} if phases else {}}))


def _children(pid: int) -> list[int] | None:
    """`pid`'s child processes from /proc/<pid>/task/*/children (None where the kernel does not list them)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
    except FileNotFoundError:
        return None if not os.path.isdir(f"/proc/{pid}") else kids  # gone meanwhile: no children
    except OSError:
        return kids
    return kids


def _all_children() -> dict[int, list[int]]:
    """Parent -> children of every process (a full /proc scan: the fallback where `_children` is None)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def tree_usage(pid: int, cpu: dict[int, float], names: dict[int, str] | None = None) -> int:
    """Summed RSS (bytes) of `pid` and all its descendants, from /proc; records each one's CPU seconds
    (utime + stime, last seen) in `cpu` and its name (`comm`: python, raylet, gcs_server, ray::GroupWorker...) in
    `names`. Walks the tree through the kernel's children lists (a few files per process of the tree, not a scan
    of every process: the sampler runs on the arm's cores too, and a 2-worker arm has none to spare)."""
    total, todo, seen = 0, [pid], set()
    everyone: dict[int, list[int]] | None = None
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        fields = tail.split()
        cpu[p] = max(cpu.get(p, 0.0), (int(fields[11]) + int(fields[12])) / tick)
        comm = head.split("(", 1)[1]
        if names is not None and comm and not comm.startswith("ray::IDLE"):
            names[p] = comm
        kids = _children(p)
        if kids is None:
            everyone = everyone if everyone is not None else _all_children()
            kids = everyone.get(p, [])
        todo.extend(kids)
    return total


def arm_cores(workers: int, pin: bool) -> list[int] | None:
    """The cores an arm may use: the first `workers` of this process's allowed CPUs when pinning (a worker is one
    core: the 1-worker arm's helper threads, such as embed's decode and prefetch threads or ingest's image readers,
    cannot borrow the second core), None when not pinning."""
    if not pin:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < workers:
        raise SystemExit(f"--pin needs {workers} allowed CPUs, this process has {allowed}")
    return allowed[:workers]


def run_arm(step: str, workers: int, root: Path, group_size: int, shard_samples: int = 250, eval_items: int = 10_000,
            rephrase_shards: int = 0, pin: bool = True) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("RAY_TMPDIR", OWN_RAY_TMPDIR)  # not the shared /tmp/ray of other users
    cores = arm_cores(workers, pin)  # inherited by every process of the arm: Ray's daemons and actors included
    p = subprocess.Popen([sys.executable, __file__, "--arm", step, "--workers", str(workers), "--root", str(root),
                          "--group-size", str(group_size), "--shard-samples", str(shard_samples),
                          "--eval-items", str(eval_items), "--rephrase-shards", str(rephrase_shards)],
                         stdout=subprocess.PIPE, env=env, text=True,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    peak = [0]
    cpu: dict[int, float] = {}
    names: dict[int, str] = {}

    def sample() -> None:
        while p.poll() is None:
            peak[0] = max(peak[0], tree_usage(p.pid, cpu, names))
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = p.communicate()
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"{step} with {workers} worker(s) failed (exit {p.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = peak[0] / 2**20
    res["cpu_s"] = sum(cpu.values())  # every process of the arm's tree, as last sampled (misses its last 0.1 s)
    res["cores"] = cores
    by_name: dict[str, float] = {}
    for pid, c in cpu.items():  # the arm's CPU by process kind: where a 2-worker arm's extra CPU goes
        kind = "driver" if pid == p.pid else names.get(pid, "other")
        by_name[kind] = by_name.get(kind, 0.0) + c
    res["cpu_by"] = {k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}
    return res


def same_ledger(root: Path, step: str) -> bool:
    from core.foundation.ledger import read_ledger, step_dir

    a, b = (read_ledger(step_dir(root / f"w{w}" / step / ("export" if step == "export" else ""), step)) for w in (1, 2))
    cols = ["sample_id", "decision", "reason", "score", "shard", "extra"]
    same = a.sort_values("sample_id")[cols].reset_index(drop=True).equals(b.sort_values("sample_id")[cols].reset_index(drop=True))
    if step == "ingest":  # and the one-pass ingest of the same data decided the same (sample_id, decision, reason)
        one = read_ledger(step_dir(root / "run", "ingest"))
        same = same and set(zip(one.sample_id, one.decision, one.reason)) == set(zip(a.sample_id, a.decision, a.reason))
    return same


# ---- the whole benchmark ------------------------------------------------------------------------------
def prepare(root: Path, n: int, shard_samples: int, lm: bool = True) -> dict:
    from core.demo.dataset import generate_demo
    from core.foundation.step import shards_of
    from core.io.ingest import IngestConfig, ingest
    from core.steps.perplexity.reference import train_reference_lm

    t = {"generate_s": 0.0, "ingest_s": float("nan"), "lm_s": 0.0}
    if (root / "run" / "ledger" / "ingest").is_dir() and ((root / "lm").is_dir() or not lm):  # a kept --root: reuse
        return t
    t0 = time.perf_counter()
    info = generate_demo(str(root / "data"), n, seed=0)
    t["generate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ingest(IngestConfig(info.data_json, info.images_dir, str(root / "run"), shard_max_samples=shard_samples))
    t["ingest_s"] = time.perf_counter() - t0
    if not lm:
        return t
    t0 = time.perf_counter()
    clean = json.loads(Path(info.ground_truth).read_text())["clean"][:300]
    train_reference_lm(shards_of(root / "run"), root / "lm", clean, steps=100)
    t["lm_s"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--shard-samples", type=int, default=250, help="samples per ingested shard (a unit)")
    ap.add_argument("--group-size", type=int, default=1, help="shards per fan-out group")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--eval-items", type=int, default=10_000,
                    help="decontam eval-set size (~ the default benchmarks: DocVQA val 5,349, ChartQA test 2,500, ...)")
    ap.add_argument("--rephrase-shards", type=int, default=0, help="rephrase only the first K shards (0: all)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each arm, interleaved; the fastest of each is compared (a shared host's slow spells "
                         "add to a run, never take away), every run is printed")
    ap.add_argument("--min-arm-seconds", type=float, default=60.0,
                    help="a short step repeats its pair of arms (beyond --repeat, at most --max-repeat pairs) until "
                         "each arm has run this long in all: the fastest of a few short runs, as timeit's autorange")
    ap.add_argument("--max-repeat", type=int, default=5, help="most pairs of arms per step (see --min-arm-seconds)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin the arms to 1 and 2 cores (default: pinned, so a worker is one core)")
    ap.add_argument("--root", default="", help="work folder (default: a fresh temporary one, removed after)")
    ap.add_argument("--arm", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        return arm(a.arm, a.workers, Path(a.root), a.group_size, a.shard_samples, a.eval_items, a.rephrase_shards)
    import shutil
    import tempfile

    root = Path(a.root or tempfile.mkdtemp(prefix="scale-curate-"))
    try:
        print(f"load before: {os.getloadavg()}; arms pinned to 1 and 2 cores: {a.pin} "
              f"({arm_cores(1, a.pin)}, {arm_cores(2, a.pin)})")
        steps = a.steps.split(",")
        t = prepare(root, a.samples, a.shard_samples, lm=any(s in LM_STEPS for s in steps))
        for w in (1, 2):  # fresh output folders for both arms, of the steps run now (decontam alone, with a kept
            for step in steps:  # --root, reads the 1-worker embed arm of an earlier run)
                shutil.rmtree(root / f"w{w}" / step, ignore_errors=True)
        if "decontam" in steps and "embed" not in steps and not (root / "w1" / "embed").is_dir():
            raise SystemExit("decontam reads the 1-worker embed arm's output: run embed too (or keep --root)")
        print(f"N={a.samples}: generate {t['generate_s']:.1f}s, ingest (1 process) {t['ingest_s']:.1f}s "
              f"({a.samples / t['ingest_s']:.0f} samples/s), tiny LM {t['lm_s']:.1f}s")
        rows, effs = [], []
        for step in steps:
            runs: dict[int, list[dict]] = {1: [], 2: []}
            rep = 0  # interleaved (1w, 2w, 1w, 2w...): a slow spell of the host hits both
            while rep < a.repeat or (rep < a.max_repeat and min(sum(r["seconds"] for r in runs[w]) for w in (1, 2))
                                     < a.min_arm_seconds):
                rep += 1
                for w in (1, 2):
                    if rep > 1:  # every run into a fresh folder
                        shutil.rmtree(root / f"w{w}" / step, ignore_errors=True)
                    runs[w].append(run_arm(step, w, root, a.group_size, a.shard_samples, a.eval_items,
                                           a.rephrase_shards, a.pin))
            r1, r2 = (min(runs[w], key=lambda r: r["seconds"]) for w in (1, 2))  # the least disturbed run of each
            eff = r1["seconds"] / r2["seconds"] / 2
            effs.append(eff)
            rows.append((step, r1, r2, eff, same_ledger(root, step)))
            print(f"{step:<11} n={r1['n']:<7} units={r1['units']:<4} 1w {r1['n'] / r1['seconds']:8.1f}/s "
                  f"({r1['seconds']:6.1f}s, {r1['peak_rss_mb']:5.0f} MB)  2w {r2['n'] / r2['seconds']:8.1f}/s "
                  f"({r2['seconds']:6.1f}s, {r2['peak_rss_mb']:5.0f} MB, ray start {r2['ray_start_s']:.1f}s)  "
                  f"eff {eff:.2f}  same ledger: {rows[-1][4]}  load {os.getloadavg()[0]:.1f}", flush=True)
            ph = r2.get("phases") or {}
            timeline = (f"2w driver: {ph['before_pool_s']:.1f}s before the pool (imports, inputs, stamp), pool "
                        f"{ph['pool_s']:.1f}s (actors started in {r2['actors_ready_s']:.1f}s), reduce "
                        f"{ph['reduce_s']:.1f}s" if ph else f"2w actors started in {r2['actors_ready_s']:.1f}s")
            print(f"{'':<11} {timeline};  CPU s of the arm's processes (Ray's included): 1w {r1['cpu_s']:.1f}  "
                  f"2w {r2['cpu_s']:.1f}", flush=True)
            print(f"{'':<11} CPU s by process: 1w {r1['cpu_by']}  2w {r2['cpu_by']}", flush=True)
            if rep > 1:
                pairs = [x["seconds"] / y["seconds"] / 2 for x, y in zip(runs[1], runs[2])]
                print(f"{'':<11} runs (s): 1w {[round(r['seconds'], 1) for r in runs[1]]}  "
                      f"2w {[round(r['seconds'], 1) for r in runs[2]]}; efficiency per pair "
                      f"{[round(x, 2) for x in pairs]} (median {statistics.median(pairs):.2f})", flush=True)
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        print(f"ratio: {min(effs):.2f}")
    finally:
        if not a.root:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(OWN_RAY_TMPDIR, ignore_errors=True)


if __name__ == "__main__":
    main()
