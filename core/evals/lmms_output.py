"""lmms-eval-shaped outputs of one checkpoint's evaluation, so the files read like `lmms_eval --log_samples`:

    lmms_eval/results.json                 {"results": {task: {"<metric>,none": v, "<metric>_stderr,none": se}},
                                            "n-samples", "higher_is_better", "configs", "versions", "config",
                                            "mmcurate" (checkpoint, variant, step, epoch, status), "code", "date"}
    lmms_eval/samples_<benchmark>.jsonl    one line per doc: doc_id, target, resps, filtered_resps, the metric
                                           value(s), prompt (+ sample_id, extracted, parsing_success, error)

Standard errors are lmms-eval's for `mean` aggregations (`mean_stderr`: sample std / sqrt(n); "N/A" for
n < 2). Every metric of these tasks aggregates by mean, so lmms-eval bootstraps none of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.evals.registry import get_benchmark

LMMS_EVAL_REFERENCE = "0.7.3"
REFERENCES = {
    "docvqa": f"lmms-eval {LMMS_EVAL_REFERENCE} docvqa_val (anls)",
    "chartqa": f"lmms-eval {LMMS_EVAL_REFERENCE} chartqa (relaxed_correctness)",
    "countbench": f"lmms-eval {LMMS_EVAL_REFERENCE} countbench (acc)",
    "realworldqa": f"lmms-eval {LMMS_EVAL_REFERENCE} realworldqa (extract_mcq_answer)",
    "pixmo_points": "Molmo olmo/eval/evaluators.py PointingEval (f1, precision, recall)",
}
_EVALS_DIR = Path(__file__).resolve().parent


# How each early-signal metric is computed, in lmms-eval's output-type words (core/evals/likelihood.py).
EARLY_SIGNAL_TYPES = {
    "answer_nll": "loglikelihood of the gold answer (+ end of turn) given image and prompt, mean per token; "
                  "teacher forcing with the trainer's encoding; lower is better",
    "mc_acc": "multiple_choice: the option with the highest summed loglikelihood as continuation is the gold one",
    "mc_gold_prob": "multiple_choice: the gold option's softmax share of the options' loglikelihoods",
}


def _early_results(row: dict[str, Any]) -> dict[str, Any]:
    """The summary row's early-signal means as lmms-eval result keys (`answer_nll,none`, `mc_acc,none`, ...);
    a metric no item had is left out."""
    out: dict[str, Any] = {}
    for name, n_col in (("answer_nll", "n_answer_nll"), ("mc_acc", "n_mc"), ("mc_gold_prob", "n_mc")):
        if not row.get(n_col):
            continue
        out[f"{name},none"] = row[name]
        se = row.get(f"{name}_stderr")
        if name != "mc_gold_prob":
            out[f"{name}_stderr,none"] = se if se is not None and not math.isnan(se) else "N/A"
    return out


def _clean(v: Any) -> Any:
    """JSON-safe: NaN -> None (json.dumps would write the non-standard NaN)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy / pandas scalars
        return _clean(v.item())
    return v


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_versions() -> dict[str, Any]:
    """mmcurate's version, git commit (when run from a checkout), a hash of the eval code, library versions."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=_EVALS_DIR, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD") or None
    dirty = None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    h = hashlib.sha256()
    for f in sorted(_EVALS_DIR.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"mmcurate_version": ver("mmcurate"), "git_hash": commit, "git_dirty_evals": dirty,
            "evals_code_sha256": h.hexdigest(),
            "reference_scoring": REFERENCES,
            "libraries": {n: ver(n) for n in ("torch", "transformers", "vllm", "numpy", "rapidfuzz", "scipy")}}  # fmt: skip


def sample_line(rec: dict[str, Any], metric_name: str, max_new_tokens: int) -> dict[str, Any]:
    """One record as an lmms-eval log_samples line."""
    raw = rec["raw_output"]
    target = json.loads(rec["target"]) if rec["target"] else None
    metrics = json.loads(rec["metrics"]) if rec["metrics"] else {}
    if rec["error"]:
        metrics = {metric_name: 0.0}  # failures count 0, as in the summary
    line = {
        "doc_id": int(rec["doc_id"]), "sample_id": rec["sample_id"], "target": target,
        "arguments": {"prompt": rec["prompt"], "max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False},
        "resps": [[raw]] if raw is not None else [],
        "filtered_resps": [raw] if raw is not None else [],  # these tasks use lmms-eval's "none" filter
        **metrics,
        "extracted": json.loads(rec["parsed_output"]) if rec["parsed_output"] else None,
        "parsing_success": bool(rec["parsing_success"]), "prompt": rec["prompt"], "error": rec["error"],
        "prompt_hash": _sha256(rec["prompt"]), "target_hash": _sha256(json.dumps(target)),
    }  # fmt: skip
    if rec["score"] is None or (isinstance(rec["score"], float) and math.isnan(rec["score"])):
        line["excluded"] = True  # the reference evaluator leaves this sample out of its mean
    nll = rec.get("answer_nll")
    if nll is not None and not (isinstance(nll, float) and math.isnan(nll)):  # early-signal metrics: extra keys
        line["answer_nll"], line["answer_tokens"] = nll, int(rec["answer_tokens"])
    mc = rec.get("mc_correct")
    if mc is not None and not (isinstance(mc, float) and math.isnan(mc)):
        line.update(mc_acc=mc, mc_choice=rec["mc_choice"], mc_gold_prob=rec["mc_gold_prob"])
    lenient = rec.get("lenient_score")
    if lenient is not None and not (isinstance(lenient, float) and math.isnan(lenient)):
        line["lenient"] = {"score": lenient, "parsing_success": bool(rec["lenient_parsing_success"]),
                           "parsed": json.loads(rec["lenient_parsed_output"])}  # fmt: skip
    return _clean(line)


def write_lmms_outputs(records: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], cfg: Any,
                       checkpoint: str, out: str, model: str = "") -> str:
    """Write `results.json` and one `samples_<benchmark>.jsonl` per benchmark into `out`; returns its path."""
    os.makedirs(out, exist_ok=True)
    results, n_samples, hib, configs, versions, status = {}, {}, {}, {}, {}, {}
    for row in summary:
        name = row["benchmark"]
        status[name] = {"status": row["status"], "error": row["error"]}
        try:
            bench = get_benchmark(name)
        except KeyError:
            continue
        agg = json.loads(row["metrics"]) if row["metrics"] else {}
        res: dict[str, Any] = {"alias": name}
        for metric, a in agg.items():
            res[f"{metric},none"] = a["value"]
            res[f"{metric}_stderr,none"] = a["stderr"] if a["stderr"] is not None else "N/A"
        if row.get("lenient_metric"):
            res[f"lenient_{row['lenient_metric']},none"] = row["lenient_score"]
        early = _early_results(row)
        res.update(early)
        results[name] = res
        n_samples[name] = {"original": int(row["n"]), "effective": int(row["n_scored"])}
        hib[name] = ({m: True for m in agg} or {bench.metric_name: True}) | {
            m.split(",")[0]: m.startswith("mc_") for m in early if "_stderr" not in m}
        configs[name] = {"task": name, "output_type": "generate_until",
                         "generation_kwargs": {"max_new_tokens": bench.max_new_tokens, "temperature": 0,
                                               "do_sample": False},
                         "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                         for m in (agg or {bench.metric_name: None})],
                         "scoring": cfg.scoring, "reference": REFERENCES.get(name, ""),
                         "early_signal": EARLY_SIGNAL_TYPES}  # fmt: skip
        versions[name] = REFERENCES.get(name, "")
        recs = [r for r in records if r["benchmark"] == name]
        with open(os.path.join(out, f"samples_{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in sorted(recs, key=lambda r: int(r["doc_id"])):
                f.write(json.dumps(sample_line(r, bench.metric_name, bench.max_new_tokens), ensure_ascii=False) + "\n")
    first = summary[0] if summary else {}
    doc = {
        "results": results, "n-samples": n_samples, "higher_is_better": hib, "configs": configs,
        "versions": versions,
        "config": {"model": model, "model_args": f"pretrained={checkpoint}", "batch_size": cfg.batch_size,
                   "device": cfg.device, "limit": cfg.max_samples or None,
                   "stderr": "mean_stderr (lmms-eval's for mean aggregation; no bootstrap)",
                   "scoring": cfg.scoring, "benchmarks": list(cfg.benchmarks), "cache_dir": cfg.cache_dir},
        "mmcurate": {"checkpoint": checkpoint, "checkpoint_name": first.get("checkpoint_name", ""),
                     "variant": first.get("variant", ""), "step": first.get("step"), "epoch": first.get("epoch"),
                     "status": status},
        "code": code_versions(), "date": time.time(),
    }  # fmt: skip
    path = os.path.join(out, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(doc), f, indent=2, ensure_ascii=False)
    return path


def gather_lmms_outputs(worker_dirs: Sequence[str], out_dir: str) -> str:
    """Copy each worker's `lmms_eval/` to `<out_dir>/lmms_eval/<worker>/` and write `<out_dir>/results.json`:
    {"checkpoints": {checkpoint: results.json of its worker(s), merged over benchmark groups}}."""
    merged: dict[str, dict[str, Any]] = {}
    for d in worker_dirs:
        src = os.path.join(d, "lmms_eval")
        if not os.path.isfile(os.path.join(src, "results.json")):
            continue  # a lost worker: its failed rows are in summary.parquet
        dst = os.path.join(out_dir, "lmms_eval", os.path.basename(os.path.normpath(d)))
        shutil.copytree(src, dst, dirs_exist_ok=True)
        with open(os.path.join(src, "results.json"), encoding="utf-8") as f:
            res = json.load(f)
        ckpt = res["mmcurate"]["checkpoint"]
        if ckpt in merged:
            for key in ("results", "n-samples", "higher_is_better", "configs", "versions"):
                merged[ckpt][key].update(res[key])
            merged[ckpt]["mmcurate"]["status"].update(res["mmcurate"]["status"])
        else:
            merged[ckpt] = res
    path = os.path.join(out_dir, "results.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"checkpoints": merged}, f, indent=2, ensure_ascii=False)
    return path
