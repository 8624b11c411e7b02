"""Evaluate checkpoints on benchmarks: the loop from benchmark items to per-sample records (one benchmark),
one worker per checkpoint (fetch once, every benchmark, release), and a parallel runner whose pool size is a
hard cap on checkpoints held at once. Settings: `core.evals.config`; checkpoints and their local copies:
`core.evals.checkpoints`; schemas, aggregation and the reduce: `core.evals.results`.

Scoring: `score` is always the reference score (lmms-eval's task code; Molmo's PointingEval for PixMo),
`EvalConfig.scoring = "lenient"` adds the lenient parsers' score beside it (`lenient_score`), never instead.
Early-signal metrics (core/evals/likelihood.py: the gold answer's teacher-forced NLL, lmms-eval's multiple-choice
likelihood pick) are computed by the same worker on the same batches, as extra columns beside the score.

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
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.evals.backends import GenRequest, VLMBackend, load_backend
from core.evals.base import Benchmark, EvalItem, LoadFailure, Parsed, Reference
from core.evals.checkpoints import CheckpointStore, checkpoint_name, position_fields
from core.evals.config import EvalConfig
from core.evals.registry import get_benchmark
from core.evals.results import (
    RECORD_COLUMNS,
    SUMMARY_COLUMNS,
    EvalResults,
    collect_results,
    failed_row,
    jsonable,
    summarize,
    write_parquet,
)
from core.foundation.log import progress
from core.foundation.sample import SampleError

log = logging.getLogger(__name__)


def decode_images(item: EvalItem) -> list[Any]:
    """The item's images as RGB PIL images, through the project's decode checks (core.io.images.decode_image:
    SampleError on corrupt bytes or a decompression bomb)."""
    from core.io.images import decode_image

    return [decode_image(data) for data in item.images]


def _target_json(bench: Benchmark, item: EvalItem) -> str:
    if isinstance(item.target, dict) and "masks" in item.target:  # masks are big: keep the points only
        return jsonable({"points": item.target.get("points")})
    return jsonable(item.target)


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


def evaluate_benchmark(
    backend: VLMBackend, bench: Benchmark, root: str, *, checkpoint: str = "", batch_size: int = 8, max_samples: int = 0,
    scoring: str = "exact",
) -> list[dict[str, Any]]:
    """Run `bench` (cache at `root`) through `backend`; one record per item, failures included. `score` is
    the reference score (None where the reference evaluator excludes the sample); with scoring="lenient"
    the lenient parser's score is added as `lenient_score`."""
    base = {**position_fields(checkpoint), "benchmark": bench.name}
    lenient = scoring == "lenient"

    def record(sid: str, doc_id: int, **kw: Any) -> dict[str, Any]:
        rec = {**base, "doc_id": doc_id, "sample_id": sid, "prompt": "", "raw_output": None,
               "parsed_output": jsonable(None), "parsing_success": False, "score": 0.0, "correct": False,
               "metrics": jsonable({}), "lenient_parsed_output": jsonable(None), "lenient_parsing_success": False,
               "lenient_score": 0.0 if lenient else float("nan"), "latency_s": 0.0, "error": "",
               "target": jsonable(None), "details": jsonable({}), **_NO_EARLY}  # fmt: skip
        rec.update(kw)
        return rec

    records: list[dict[str, Any]] = []
    pending: list[tuple[int, EvalItem, GenRequest]] = []

    def flush() -> None:
        outs = _generate_isolated(backend, [r for _, _, r in pending])
        early = early_signal(backend, bench, [(item, req) for _, item, req in pending])
        for (doc_id, item, req), (out, err, dt), (ekw, eerr) in zip(pending, outs, early, strict=True):
            ref = bench.reference(out, item) if out is not None else Reference(None, False, {}, 0.0, False)
            kw: dict[str, Any] = {}
            details: dict[str, Any] = {}
            if lenient:
                parsed = bench.parse(out, item) if out is not None else Parsed(None, False, "no_output")
                scored = bench.score(parsed, item)
                details = {**scored.details, **({"lenient_parse_reason": parsed.reason} if parsed.reason else {})}
                kw = {"lenient_parsed_output": jsonable(parsed.value), "lenient_parsing_success": parsed.ok,
                      "lenient_score": float(scored.score)}  # fmt: skip
            if ref.score is None:
                details["excluded"] = "the reference evaluator leaves this sample out of its mean"
            if eerr:
                details["early_signal_error"] = eerr
            kw.update(ekw)
            records.append(record(item.id, doc_id, prompt=req.prompt, raw_output=out,
                                  parsed_output=jsonable(ref.extracted), parsing_success=ref.ok,
                                  score=float("nan") if ref.score is None else float(ref.score),
                                  correct=bool(ref.correct), metrics=jsonable(ref.metrics), latency_s=dt, error=err,
                                  target=_target_json(bench, item), details=jsonable(details), **kw))  # fmt: skip
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
            images = decode_images(item)
        except Exception as e:  # corrupt image bytes or a bomb: record, never crash
            why = f"{e.reason}:{e.detail.split(':')[0]}" if isinstance(e, SampleError) else \
                f"corrupt_image:{type(e).__name__}"
            records.append(record(item.id, doc_id, prompt=prompt, error=why,
                                  target=_target_json(bench, item)))  # fmt: skip
            continue
        pending.append((doc_id, item, GenRequest(images, prompt, bench.max_new_tokens)))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    return records


# ---- early-signal metrics (core/evals/likelihood.py) ----------------------------------------------------

_NO_EARLY = {"answer_nll": float("nan"), "answer_tokens": 0, "mc_choice": "", "mc_correct": float("nan"),
             "mc_gold_prob": float("nan")}


def early_signal(backend: VLMBackend, bench: Benchmark, items: Sequence[tuple[EvalItem, GenRequest]]
                 ) -> list[tuple[dict[str, Any], str]]:
    """Per item, the early-signal record fields (`answer_nll`, `answer_tokens`, `mc_choice`, `mc_correct`,
    `mc_gold_prob`; NaN/empty where they do not apply) and an error ('' when none). One `loglikelihood` call
    for the whole batch; when it raises, item by item, so one failing item leaves the others' numbers. A
    backend without `loglikelihood` gets NaN everywhere and no error."""
    from core.evals.likelihood import LikelihoodRequest, choice_stats

    if not hasattr(backend, "loglikelihood"):
        return [(dict(_NO_EARLY), "") for _ in items]
    plans = []
    for item, req in items:
        gold = bench.gold_answer(item)
        mc = bench.choices(item)
        reqs = [LikelihoodRequest(req.images, req.prompt, gold, True)] if gold is not None else []
        reqs += [LikelihoodRequest(req.images, req.prompt, c, False) for c in (mc[0] if mc else [])]
        plans.append((gold is not None, mc, reqs))

    def run(reqs: list[Any]) -> list[Any]:
        res = backend.loglikelihood(reqs) if reqs else []
        if len(res) != len(reqs):
            raise RuntimeError(f"backend returned {len(res)} likelihoods for {len(reqs)} requests")
        return res

    flat = [r for _, _, reqs in plans for r in reqs]
    try:
        got, per_item = run(flat), None
    except Exception as batch_error:  # isolate the failing item(s), as generation does
        log.warning("likelihood batch of %d failed (%s); retrying item by item", len(flat), batch_error)
        got, per_item = [], []
        for _, _, reqs in plans:
            try:
                per_item.append((run(reqs), ""))
            except Exception as e:
                per_item.append((None, f"likelihood_error:{type(e).__name__}: {e}"[:500]))
    out, k = [], 0
    for i, (has_gold, mc, reqs) in enumerate(plans):
        if per_item is None:
            res, err = got[k : k + len(reqs)], ""
            k += len(reqs)
        else:
            res, err = per_item[i]
        kw = dict(_NO_EARLY)
        if res is not None:
            if has_gold:
                kw.update(answer_nll=res[0].nll, answer_tokens=res[0].n_tokens)
            if mc:
                options, gold_idx = mc
                pick, correct, share = choice_stats([r.logprob for r in res[int(has_gold):]], gold_idx)
                kw.update(mc_choice=options[pick], mc_correct=correct, mc_gold_prob=share)
        out.append((kw, err))
    return out


# ---- one checkpoint (one worker) ----------------------------------------------------------------------


def _slug(uri: str, benchmarks: Sequence[str]) -> str:
    """A worker directory name unique per (checkpoint, benchmark group)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", checkpoint_name(uri))[:60]
    key = uri + "|" + ",".join(benchmarks)
    return f"{base}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


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
                summary.append(failed_row(checkpoint, name, f"benchmark_error:{type(e).__name__}: {e}"))
    except Exception as e:  # download/load failure: all rows of this checkpoint are failed, others go on
        log.exception("checkpoint %s failed", checkpoint)
        done = {r["benchmark"] for r in summary}
        summary += [failed_row(checkpoint, n, f"checkpoint_error:{type(e).__name__}: {e}")
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
