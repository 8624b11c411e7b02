"""Evaluate checkpoints on benchmarks: per-sample records, per-(checkpoint, benchmark) summaries, and a
parallel runner whose pool size is a hard cap on checkpoints held at once.

Scoring: `score` is always the reference score (lmms-eval's task code; Molmo's PointingEval for PixMo),
`EvalConfig.scoring = "lenient"` adds the lenient parsers' score beside it (`lenient_score`), never instead.

Outputs per checkpoint worker: `records.parquet`, `summary.parquet`, and the lmms-eval-shaped
`lmms_eval/samples_<benchmark>.jsonl` (doc_id, target, resps, filtered_resps, metric values, prompt) and
`lmms_eval/results.json` (per-benchmark metrics with lmms-eval's `mean_stderr`, sample counts, config,
model and code versions).

Failure policy: a sample that cannot be loaded, decoded, generated or parsed becomes a record with an
`error` (or parsing_success=False) and score 0; a benchmark whose files are missing becomes a summary row
with status "failed"; a checkpoint that cannot be downloaded or loaded marks all its rows "failed". None of
these stop the other samples, benchmarks or checkpoints.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from core.configs import check_ranges
from core.evals.backends import GenRequest, VLMBackend, load_backend
from core.evals.base import Benchmark, EvalItem, LoadFailure, Parsed, Reference, get_benchmark
from core.evals.exact import mean_and_stderr
from core.log import progress

log = logging.getLogger(__name__)

RECORD_COLUMNS = [
    "checkpoint", "checkpoint_name", "variant", "step", "epoch", "benchmark", "doc_id", "sample_id", "prompt",
    "raw_output", "parsed_output", "parsing_success", "score", "correct", "metrics", "lenient_parsed_output",
    "lenient_parsing_success", "lenient_score", "latency_s", "error", "target", "details",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "checkpoint", "checkpoint_name", "variant", "step", "epoch", "benchmark", "metric", "score", "score_stderr",
    "parse_rate", "n", "n_scored", "n_errors", "lenient_metric", "lenient_score", "metrics", "status", "error",
]  # fmt: skip
SCORINGS = ("exact", "lenient")


@dataclass
class EvalConfig:
    """Evaluation settings.

    cache_dir: root of the benchmark caches, `<cache_dir>/<benchmark>/...` (local path or fsspec URL).
    benchmarks: benchmark names (see `core.evals.base.benchmark_names()`).
    backend: "auto" | "mini_llava" | "transformers" | "vllm" | a registered kind.
    device: "cpu" | "cuda" | "auto".
    batch_size: requests per `generate` call.
    max_samples: per benchmark cap (0 = all), for smoke runs.
    concurrency: checkpoints evaluated (and held on local disk) at once.
    local_dir: where checkpoints are downloaded ("" = the system temp dir).
    scoring: "exact" (reference scoring only) | "lenient" (also the lenient parsers' score, beside it).
    """

    cache_dir: str
    benchmarks: list[str]
    backend: str = "auto"
    device: str = "auto"
    batch_size: int = 8
    max_samples: int = 0
    concurrency: int = 2
    local_dir: str = ""
    scoring: str = "exact"

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        check_ranges(self, {"batch_size": (1, None), "max_samples": (0, None), "concurrency": (1, None)})


def tiny_eval_config(cache_dir: str) -> EvalConfig:
    """Demo/test preset: all five benchmarks on the fixtures, CPU, cap 2."""
    return EvalConfig(cache_dir, ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"],
                      device="cpu", batch_size=4, concurrency=2)  # fmt: skip


def full_eval_config(cache_dir: str) -> EvalConfig:
    """Production preset: all five benchmarks, vLLM on GPU, cap 2 (one checkpoint per GPU worker)."""
    return EvalConfig(cache_dir, ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"],
                      backend="vllm", device="cuda", batch_size=64, concurrency=2)  # fmt: skip


# ---- checkpoints --------------------------------------------------------------------------------------


def checkpoint_name(uri: str) -> str:
    """The checkpoint's last path component ('s3://b/run/epoch_3/' -> 'epoch_3')."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


_STEP_RE = re.compile(r"(?:^|[-_])(?:step|checkpoint|global_step|iter)[-_]?(\d+)$", re.IGNORECASE)
_EPOCH_RE = re.compile(r"(?:^|[-_])(?:epoch|ep)[-_]?(\d+)$", re.IGNORECASE)
STATE_FILE = "trainer_state.json"  # written by core/train next to every checkpoint


@dataclass(frozen=True)
class CheckpointPosition:
    """Where a checkpoint sits in training: global step, epoch (fractional mid-epoch) and its variant."""

    step: int | None
    epoch: float | None
    variant: str


def checkpoint_variant(uri: str) -> str:
    """The training run a checkpoint belongs to: the directory holding it, skipping a `checkpoints/` level
    (`s3://b/runs/dedup10/checkpoints/epoch-0002` -> `dedup10`)."""
    parts = [p for p in uri.rstrip("/").split("/") if p]
    parents = parts[:-1]
    if parents and parents[-1] == "checkpoints":
        parents = parents[:-1]
    return parents[-1] if parents else ""


def _read_state(uri: str) -> dict[str, Any] | None:
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(uri)
        with fs.open(path.rstrip("/") + "/" + STATE_FILE, "r") as f:
            state = json.load(f)
        return state if isinstance(state, dict) else None
    except (FileNotFoundError, ValueError):
        return None
    except Exception as e:  # unreachable store, no credentials, ...: the name still gives step or epoch
        log.warning("cannot read %s of %s (%s: %s); step/epoch come from its name", STATE_FILE, uri,
                    type(e).__name__, e)  # fmt: skip
        return None


_POSITIONS: dict[str, CheckpointPosition] = {}


def checkpoint_position(uri: str) -> CheckpointPosition:
    """Step and epoch of a checkpoint: from its `trainer_state.json` when present (global_step; epoch =
    completed epochs + step_in_epoch / steps_per_epoch, or the float epoch of a transformers Trainer
    state), else from its name: `step-00000030`,
    `checkpoint-300`, `global_step300` are steps, `epoch-0003`, `epoch_3`, `ep3` are epochs; other names
    give neither. Cached per URI (read once per run)."""
    if uri in _POSITIONS:
        return _POSITIONS[uri]
    step: int | None = None
    epoch: float | None = None
    state = _read_state(uri) if uri else None
    if state is not None and isinstance(state.get("global_step"), int):
        step = state["global_step"]
        spe = (state.get("data") or {}).get("steps_per_epoch")
        ep, sie = state.get("epoch"), state.get("step_in_epoch")
        if isinstance(ep, (int, float)) and not isinstance(ep, bool):  # HF Trainer's state: a float epoch
            epoch = float(ep) + (sie / spe if isinstance(sie, int) and spe else 0.0)
    else:
        name = checkpoint_name(uri)
        if m := _STEP_RE.search(name):
            step = int(m.group(1))
        elif m := _EPOCH_RE.search(name):
            epoch = float(m.group(1))
    run_name = state.get("run_name") if state is not None else None
    variant = run_name if isinstance(run_name, str) and run_name else checkpoint_variant(uri)
    pos = CheckpointPosition(step, epoch, variant)
    _POSITIONS[uri] = pos
    return pos


def checkpoint_epoch(uri: str) -> float | None:
    """The checkpoint's epoch (see `checkpoint_position`); None for a step-named checkpoint without state."""
    return checkpoint_position(uri).epoch


def checkpoint_step(uri: str) -> int | None:
    """The checkpoint's global step (see `checkpoint_position`)."""
    return checkpoint_position(uri).step


def _slug(uri: str, benchmarks: Sequence[str]) -> str:
    """A worker directory name unique per (checkpoint, benchmark group)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", checkpoint_name(uri))[:60]
    key = uri + "|" + ",".join(benchmarks)
    return f"{base}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


class CheckpointStore:
    """Downloads a checkpoint directory to a local temp dir (fsspec `get`) and deletes it afterwards. The
    runner calls `fetch` once per worker and `release` in a `finally`."""

    def __init__(self, local_dir: str = ""):
        self.local_dir = local_dir or None

    def fetch(self, uri: str) -> str:
        """Copy `uri` (directory, local path or URL) to a fresh local directory; return its path."""
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(uri)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {uri}")
        dest = tempfile.mkdtemp(prefix="ckpt-", dir=self.local_dir)
        target = os.path.join(dest, checkpoint_name(uri))
        fs.get(path.rstrip("/") + "/", target + "/", recursive=True)
        return target

    def release(self, local_path: str) -> None:
        """Delete the local copy made by `fetch`."""
        shutil.rmtree(os.path.dirname(local_path), ignore_errors=True)


# ---- one benchmark ------------------------------------------------------------------------------------


def _decode(item: EvalItem) -> list[Any]:
    from PIL import Image

    images = []
    for data in item.images:
        im = Image.open(_io.BytesIO(data))
        im.load()
        images.append(im.convert("RGB"))
    return images


def _jsonable(value: Any) -> str:
    return json.dumps(value, default=str)


def _target_json(bench: Benchmark, item: EvalItem) -> str:
    if isinstance(item.target, dict) and "masks" in item.target:  # masks are big: keep the points only
        return _jsonable({"points": item.target.get("points")})
    return _jsonable(item.target)


def _generate_isolated(backend: VLMBackend, reqs: list[GenRequest]) -> list[tuple[str | None, str, float]]:
    """(output, error, latency) per request: the batch at once, and one by one if the batch raises."""
    t0 = time.perf_counter()
    try:
        outs = backend.generate(reqs)
        if len(outs) != len(reqs):
            raise RuntimeError(f"backend returned {len(outs)} outputs for {len(reqs)} requests")
        dt = (time.perf_counter() - t0) / len(reqs)
        return [(str(o), "", dt) for o in outs]
    except Exception as batch_error:  # isolate the failing sample(s); others still get answers
        log.warning("batch of %d failed (%s); retrying one by one", len(reqs), batch_error)
    results = []
    for r in reqs:
        t0 = time.perf_counter()
        try:
            out = backend.generate([r])
            results.append((str(out[0]), "", time.perf_counter() - t0))
        except Exception as e:
            results.append((None, f"generation_error:{type(e).__name__}: {e}"[:500], time.perf_counter() - t0))
    return results


def _position_fields(checkpoint: str) -> dict[str, Any]:
    pos = checkpoint_position(checkpoint) if checkpoint else CheckpointPosition(None, None, "")
    return {"checkpoint": checkpoint, "checkpoint_name": checkpoint_name(checkpoint) if checkpoint else "",
            "variant": pos.variant, "step": pos.step, "epoch": pos.epoch}  # fmt: skip


def evaluate_benchmark(
    backend: VLMBackend, bench: Benchmark, root: str, *, checkpoint: str = "", batch_size: int = 8, max_samples: int = 0,
    scoring: str = "exact",
) -> list[dict[str, Any]]:
    """Run `bench` (cache at `root`) through `backend`; one record per item, failures included. `score` is
    the reference score (None where the reference evaluator excludes the sample); with scoring="lenient"
    the lenient parser's score is added as `lenient_score`."""
    base = {**_position_fields(checkpoint), "benchmark": bench.name}
    lenient = scoring == "lenient"

    def record(sid: str, doc_id: int, **kw: Any) -> dict[str, Any]:
        rec = {**base, "doc_id": doc_id, "sample_id": sid, "prompt": "", "raw_output": None,
               "parsed_output": _jsonable(None), "parsing_success": False, "score": 0.0, "correct": False,
               "metrics": _jsonable({}), "lenient_parsed_output": _jsonable(None), "lenient_parsing_success": False,
               "lenient_score": 0.0 if lenient else float("nan"), "latency_s": 0.0, "error": "",
               "target": _jsonable(None), "details": _jsonable({})}  # fmt: skip
        rec.update(kw)
        return rec

    records: list[dict[str, Any]] = []
    pending: list[tuple[int, EvalItem, GenRequest]] = []

    def flush() -> None:
        outs = _generate_isolated(backend, [r for _, _, r in pending])
        for (doc_id, item, req), (out, err, dt) in zip(pending, outs, strict=True):
            ref = bench.reference(out, item) if out is not None else Reference(None, False, {}, 0.0, False)
            kw: dict[str, Any] = {}
            details: dict[str, Any] = {}
            if lenient:
                parsed = bench.parse(out, item) if out is not None else Parsed(None, False, "no_output")
                scored = bench.score(parsed, item)
                details = {**scored.details, **({"lenient_parse_reason": parsed.reason} if parsed.reason else {})}
                kw = {"lenient_parsed_output": _jsonable(parsed.value), "lenient_parsing_success": parsed.ok,
                      "lenient_score": float(scored.score)}  # fmt: skip
            if ref.score is None:
                details["excluded"] = "the reference evaluator leaves this sample out of its mean"
            records.append(record(item.id, doc_id, prompt=req.prompt, raw_output=out,
                                  parsed_output=_jsonable(ref.extracted), parsing_success=ref.ok,
                                  score=float("nan") if ref.score is None else float(ref.score),
                                  correct=bool(ref.correct), metrics=_jsonable(ref.metrics), latency_s=dt, error=err,
                                  target=_target_json(bench, item), details=_jsonable(details), **kw))  # fmt: skip
        pending.clear()

    n = 0
    bar = progress(desc=f"eval {bench.name}", total=max_samples or None, unit="item")
    for item in bench.load(root):
        if max_samples and n >= max_samples:
            break
        doc_id = n
        n += 1
        bar.update(1)
        if isinstance(item, LoadFailure):
            records.append(record(item.id, doc_id, error=f"load_error:{item.reason}"))
            continue
        prompt = bench.prompt(item)
        try:
            images = _decode(item)
        except Exception as e:  # corrupt image bytes: record, never crash
            records.append(record(item.id, doc_id, prompt=prompt, error=f"corrupt_image:{type(e).__name__}",
                                  target=_target_json(bench, item)))  # fmt: skip
            continue
        pending.append((doc_id, item, GenRequest(images, prompt, bench.max_new_tokens)))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    return records


def _aggregate(records: Sequence[dict[str, Any]], bench: Benchmark) -> dict[str, Any]:
    """lmms-eval aggregation over the records: every per-sample metric the reference reports, mean and
    mean_stderr over the samples that report it (errored samples count 0 for the primary metric)."""
    per: dict[str, list[float]] = {}
    for r in records:
        m = json.loads(r["metrics"]) if r["metrics"] else {}
        if r["error"]:
            m = {bench.metric_name: 0.0}
        for k, v in m.items():
            per.setdefault(k, []).append(float(v))
    out = {}
    for k, vals in per.items():
        mu, se = mean_and_stderr(vals)
        out[k] = {"value": mu, "stderr": se, "n": len(vals)}
    return out


def summarize(records: Sequence[dict[str, Any]], bench: Benchmark, checkpoint: str,
              scoring: str = "exact") -> dict[str, Any]:
    """The (checkpoint, benchmark) row: reference score (mean over scored samples, failures count 0) with
    lmms-eval's mean_stderr, parse rate, counts, every aggregated metric; the lenient score when asked."""
    n = len(records)
    agg = _aggregate(records, bench)
    primary = agg.get(bench.metric_name, {"value": float("nan"), "stderr": None, "n": 0})
    lenient = [r["lenient_score"] for r in records] if scoring == "lenient" else []
    return {**_position_fields(checkpoint), "benchmark": bench.name, "metric": bench.metric_name,
            "score": primary["value"] if n else float("nan"),
            "score_stderr": primary["stderr"] if primary["stderr"] is not None else float("nan"),
            "parse_rate": sum(bool(r["parsing_success"]) for r in records) / n if n else float("nan"),
            "n": n, "n_scored": primary["n"], "n_errors": sum(bool(r["error"]) for r in records),
            "lenient_metric": bench.lenient_metric_name if lenient else "",
            "lenient_score": sum(lenient) / len(lenient) if lenient else float("nan"),
            "metrics": _jsonable(agg), "status": "ok" if n else "failed", "error": "" if n else "no samples"}  # fmt: skip


def _failed_row(checkpoint: str, bench_name: str, error: str) -> dict[str, Any]:
    try:
        metric = get_benchmark(bench_name).metric_name
    except KeyError:
        metric = ""
    return {**_position_fields(checkpoint), "benchmark": bench_name, "metric": metric, "score": float("nan"),
            "score_stderr": float("nan"), "parse_rate": float("nan"), "n": 0, "n_scored": 0, "n_errors": 0,
            "lenient_metric": "", "lenient_score": float("nan"), "metrics": _jsonable({}), "status": "failed",
            "error": error[:500]}  # fmt: skip


# ---- one checkpoint (one worker) ----------------------------------------------------------------------


def write_parquet(rows: Sequence[dict[str, Any]], columns: list[str], path: str) -> str:
    """Rows -> parquet with a fixed column order (an empty table keeps the columns)."""
    import pandas as pd

    df = pd.DataFrame(list(rows), columns=columns)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def evaluate_checkpoint(checkpoint: str, cfg: EvalConfig, out_dir: str, store: CheckpointStore | None = None) -> str:
    """One worker: download `checkpoint` once, load it, evaluate every benchmark in `cfg.benchmarks`, delete
    it. Writes `<out_dir>/<slug>/records.parquet`, `summary.parquet` and `lmms_eval/` (results.json and
    samples_<benchmark>.jsonl); returns that directory. Never raises for a bad checkpoint: its summary rows
    are marked failed with the error."""
    store = store or CheckpointStore(cfg.local_dir)
    wdir = os.path.join(out_dir, _slug(checkpoint, cfg.benchmarks))
    records: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    local = None
    backend = None
    try:
        log.info("fetching %s", checkpoint)
        local = store.fetch(checkpoint)
        backend = load_backend(cfg.backend, local, cfg.device)
        for name in cfg.benchmarks:
            try:
                bench = get_benchmark(name)
                t0 = time.perf_counter()
                recs = evaluate_benchmark(backend, bench, _bench_root(cfg.cache_dir, name), checkpoint=checkpoint,
                                          batch_size=cfg.batch_size, max_samples=cfg.max_samples,
                                          scoring=cfg.scoring)  # fmt: skip
                records.extend(recs)
                summary.append(summarize(recs, bench, checkpoint, cfg.scoring))
                log.info("%s %s: %s=%.4f n=%d (%.1fs)", checkpoint_name(checkpoint), name, bench.metric_name,
                         summary[-1]["score"], len(recs), time.perf_counter() - t0)  # fmt: skip
            except Exception as e:  # a missing benchmark cache must not sink the other benchmarks
                log.exception("benchmark %s failed on %s", name, checkpoint)
                summary.append(_failed_row(checkpoint, name, f"benchmark_error:{type(e).__name__}: {e}"))
    except Exception as e:  # download/load failure: all rows of this checkpoint are failed, others go on
        log.exception("checkpoint %s failed", checkpoint)
        done = {r["benchmark"] for r in summary}
        summary += [_failed_row(checkpoint, n, f"checkpoint_error:{type(e).__name__}: {e}")
                    for n in cfg.benchmarks if n not in done]  # fmt: skip
    finally:
        if backend is not None and hasattr(backend, "close"):
            backend.close()
        if local is not None:
            store.release(local)
    write_parquet(records, RECORD_COLUMNS, os.path.join(wdir, "records.parquet"))
    write_parquet(summary, SUMMARY_COLUMNS, os.path.join(wdir, "summary.parquet"))
    from core.evals.lmms_output import write_lmms_outputs

    write_lmms_outputs(records, summary, cfg, checkpoint, os.path.join(wdir, "lmms_eval"),
                       model=type(backend).__name__ if backend is not None else cfg.backend)  # fmt: skip
    return wdir


def _bench_root(cache_dir: str, name: str) -> str:
    return cache_dir.rstrip("/") + "/" + name


# ---- many checkpoints ---------------------------------------------------------------------------------


@dataclass
class EvalResults:
    """Merged outputs: all records, the summary rows, the checkpoint x benchmark score table."""

    records: Any  # pandas DataFrame
    summary: Any
    table: Any
    worker_dirs: list[str] = field(default_factory=list)

    @property
    def failed_checkpoints(self) -> list[str]:
        """Checkpoints with at least one failed (checkpoint, benchmark) row."""
        return sorted(set(self.summary.loc[self.summary["status"] != "ok", "checkpoint"]))


def collect_results(worker_dirs: Sequence[str], out_dir: str) -> EvalResults:
    """Reduce: merge worker outputs into `<out_dir>/records.parquet`, `summary.parquet`, `results.csv`
    (rows: checkpoints by variant and step, columns: benchmark scores, failed cells empty, plus a `status`
    column), and gather the workers' lmms-eval-shaped outputs under `<out_dir>/lmms_eval/<worker>/` with
    `<out_dir>/results.json` (checkpoint -> its results.json)."""
    import pandas as pd

    from core.evals.lmms_output import gather_lmms_outputs

    recs = [pd.read_parquet(os.path.join(d, "records.parquet")) for d in worker_dirs]
    sums = [pd.read_parquet(os.path.join(d, "summary.parquet")) for d in worker_dirs]
    records = pd.concat(recs, ignore_index=True) if recs else pd.DataFrame(columns=RECORD_COLUMNS)
    summary = pd.concat(sums, ignore_index=True) if sums else pd.DataFrame(columns=SUMMARY_COLUMNS)
    table = results_table(summary)
    os.makedirs(out_dir, exist_ok=True)
    write_parquet(records.to_dict("records"), RECORD_COLUMNS, os.path.join(out_dir, "records.parquet"))
    write_parquet(summary.to_dict("records"), SUMMARY_COLUMNS, os.path.join(out_dir, "summary.parquet"))
    table.to_csv(os.path.join(out_dir, "results.csv"), index=False)
    gather_lmms_outputs(worker_dirs, out_dir)
    return EvalResults(records, summary, table, list(worker_dirs))


def results_table(summary: Any) -> Any:
    """Checkpoint x benchmark scores (NaN where failed), sorted by variant, step, epoch, with status
    'ok' | 'partial' | 'failed' and the first error of each checkpoint."""
    import pandas as pd

    if summary.empty:
        return pd.DataFrame(columns=["checkpoint", "variant", "step", "epoch", "status", "error"])
    piv = summary.pivot_table(index="checkpoint", columns="benchmark", values="score", aggfunc="first", dropna=False)
    piv = piv.reset_index()
    piv.columns.name = None
    status = summary.groupby("checkpoint").apply(
        lambda g: "ok" if (g["status"] == "ok").all() else ("failed" if (g["status"] != "ok").all() else "partial"),
        include_groups=False,
    )
    errors = summary[summary["error"] != ""].groupby("checkpoint")["error"].first().to_dict()
    piv["checkpoint_name"] = piv["checkpoint"].map(checkpoint_name)
    pos = {c: checkpoint_position(c) for c in piv["checkpoint"]}
    piv["variant"] = [pos[c].variant for c in piv["checkpoint"]]
    piv["step"] = pd.array([pos[c].step for c in piv["checkpoint"]], dtype="Int64")
    piv["epoch"] = [pos[c].epoch for c in piv["checkpoint"]]
    piv["status"] = piv["checkpoint"].map(status)
    piv["error"] = [errors.get(c, "") for c in piv["checkpoint"]]
    order = ["checkpoint", "checkpoint_name", "variant", "step", "epoch", "status"]
    bench_cols = [c for c in piv.columns if c not in order + ["error"]]
    return piv[order + bench_cols + ["error"]].sort_values(["variant", "step", "epoch", "checkpoint"],
                                                          na_position="last", ignore_index=True)  # fmt: skip


def evaluate_checkpoints(
    checkpoints: Sequence[str], cfg: EvalConfig, out_dir: str, store: CheckpointStore | None = None
) -> EvalResults:
    """Evaluate every checkpoint on `cfg.benchmarks` with a thread pool of size `cfg.concurrency`: each
    worker holds exactly one checkpoint (fetch -> evaluate all benchmarks -> delete), so at most
    `cfg.concurrency` checkpoints are on local disk at once. Flyte-free twin of workflows/evaluate.py."""
    if cfg.concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    store = store or CheckpointStore(cfg.local_dir)
    wroot = os.path.join(out_dir, "workers")
    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="eval") as pool:
        dirs = list(pool.map(lambda c: evaluate_checkpoint(c, cfg, wroot, store), checkpoints))
    return collect_results(dirs, out_dir)


def list_checkpoints(prefix: str, pattern: str = "*") -> list[str]:
    """Checkpoint directories directly under `prefix` (local path or fsspec URL) whose name matches
    `pattern`, sorted by step (or epoch) then name."""
    import fnmatch

    from fsspec.core import url_to_fs

    fs, path = url_to_fs(prefix)
    proto = prefix.split("://", 1)[0] + "://" if "://" in prefix else ""
    out = []
    for info in fs.ls(path, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "directory" and fnmatch.fnmatch(name, pattern):
            full = info["name"]
            out.append(proto + full if proto and not full.startswith(proto) else full)
    def order(u: str) -> tuple:
        p = checkpoint_position(u)
        return (p.step is None and p.epoch is None, p.step if p.step is not None else -1, p.epoch or 0.0, u)

    return sorted(out, key=order)
