"""Evaluation results: the per-sample record and per-(checkpoint, benchmark) summary schemas, the lmms-eval
aggregation of records into a summary row, and the reduce that merges worker outputs into one table.

Failure policy: a benchmark or checkpoint that produced no records gets a `failed_row` (status "failed",
with the error); a worker lost after its retries gets one per benchmark of its group (`lost_worker_dir`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.evals.base import Benchmark
from core.evals.checkpoints import checkpoint_name, checkpoint_position, position_fields
from core.evals.exact import mean_and_stderr
from core.evals.registry import get_benchmark
from core.foundation.step import write_atomic, write_parquet_atomic

RECORD_COLUMNS = [
    "checkpoint", "checkpoint_name", "variant", "step", "epoch", "benchmark", "doc_id", "sample_id", "prompt",
    "raw_output", "parsed_output", "parsing_success", "score", "correct", "metrics", "lenient_parsed_output",
    "lenient_parsing_success", "lenient_score", "latency_s", "error", "target", "details",
    "answer_nll", "answer_tokens", "mc_choice", "mc_correct", "mc_gold_prob",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "checkpoint", "checkpoint_name", "variant", "step", "epoch", "benchmark", "metric", "score", "score_stderr",
    "parse_rate", "n", "n_scored", "n_errors", "lenient_metric", "lenient_score", "metrics", "status", "error",
    "answer_nll", "answer_nll_stderr", "n_answer_nll", "mc_acc", "mc_acc_stderr", "mc_gold_prob", "n_mc",
]  # fmt: skip


def jsonable(value: Any) -> str:
    """`value` as the JSON text a record column holds (non-JSON values by their `str`)."""
    return json.dumps(value, default=str)


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


def early_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means (and lmms-eval's mean_stderr) of the early-signal record columns over the items that have them:
    `answer_nll` over items with a gold answer, `mc_acc` / `mc_gold_prob` over multiple-choice items."""
    import math

    def vals(col: str) -> list[float]:
        return [float(r[col]) for r in records if r.get(col) is not None and not math.isnan(float(r[col]))]

    nan = float("nan")
    out: dict[str, Any] = {}
    for col, name in (("answer_nll", "answer_nll"), ("mc_correct", "mc_acc")):
        v = vals(col)
        mu, se = mean_and_stderr(v) if v else (nan, None)
        out[name], out[f"{name}_stderr"] = mu, se if se is not None else nan
    gp = vals("mc_gold_prob")
    out["mc_gold_prob"] = sum(gp) / len(gp) if gp else nan
    out["n_answer_nll"], out["n_mc"] = len(vals("answer_nll")), len(vals("mc_correct"))
    return out


def summarize(records: Sequence[dict[str, Any]], bench: Benchmark, checkpoint: str,
              scoring: str = "exact") -> dict[str, Any]:
    """The (checkpoint, benchmark) row: reference score (mean over scored samples, failures count 0) with
    lmms-eval's mean_stderr, parse rate, counts, every aggregated metric; the lenient score when asked."""
    n = len(records)
    agg = _aggregate(records, bench)
    primary = agg.get(bench.metric_name, {"value": float("nan"), "stderr": None, "n": 0})
    lenient = [r["lenient_score"] for r in records] if scoring == "lenient" else []
    return {**position_fields(checkpoint), "benchmark": bench.name, "metric": bench.metric_name,
            "score": primary["value"] if n else float("nan"),
            "score_stderr": primary["stderr"] if primary["stderr"] is not None else float("nan"),
            "parse_rate": sum(bool(r["parsing_success"]) for r in records) / n if n else float("nan"),
            "n": n, "n_scored": primary["n"], "n_errors": sum(bool(r["error"]) for r in records),
            "lenient_metric": bench.lenient_metric_name if lenient else "",
            "lenient_score": sum(lenient) / len(lenient) if lenient else float("nan"),
            "metrics": jsonable(agg), "status": "ok" if n else "failed", "error": "" if n else "no samples",
            **early_summary(records)}  # fmt: skip


def failed_row(checkpoint: str, bench_name: str, error: str) -> dict[str, Any]:
    """The summary row of a (checkpoint, benchmark) that produced no records: status "failed" with `error`."""
    try:
        metric = get_benchmark(bench_name).metric_name
    except KeyError:
        metric = ""
    return {**position_fields(checkpoint), "benchmark": bench_name, "metric": metric, "score": float("nan"),
            "score_stderr": float("nan"), "parse_rate": float("nan"), "n": 0, "n_scored": 0, "n_errors": 0,
            "lenient_metric": "", "lenient_score": float("nan"), "metrics": jsonable({}), "status": "failed",
            "error": error[:500], **early_summary([])}  # fmt: skip


def write_parquet(rows: Sequence[dict[str, Any]], columns: list[str], path: str) -> str:
    """Rows -> parquet with a fixed column order (an empty table keeps the columns)."""
    import pandas as pd
    import pyarrow as pa

    df = pd.DataFrame(list(rows), columns=columns)
    write_parquet_atomic(pa.Table.from_pandas(df, preserve_index=False), path)  # what df.to_parquet writes
    return path


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


def lost_worker_dir(checkpoint: str, group: str, out_dir: str, error: str = "worker_lost") -> str:
    """Stand-in output of a worker lost after its retries (OOM, node loss): no records and one failed summary
    row per benchmark of its comma-joined `group`, written to `out_dir`; returns `out_dir`."""
    rows = [failed_row(checkpoint, b, error) for b in group.split(",") if b]
    write_parquet([], RECORD_COLUMNS, os.path.join(out_dir, "records.parquet"))
    write_parquet(rows, SUMMARY_COLUMNS, os.path.join(out_dir, "summary.parquet"))
    return out_dir


def collect_worker_outputs(results: Sequence[str | None], checkpoints: Sequence[str], groups: Sequence[str],
                           out_dir: str, lost_root: str) -> EvalResults:
    """The evaluation's reduce: `collect_results` over the workers' output directories, job i being
    (checkpoints[i], groups[i]); a None result (worker lost) counts as failed rows (`lost_worker_dir`, under
    `lost_root/<i>`)."""
    dirs = [res if res is not None else lost_worker_dir(ckpt, group, os.path.join(lost_root, str(i)))
            for i, (res, ckpt, group) in enumerate(zip(results, checkpoints, groups, strict=True))]
    return collect_results(dirs, out_dir)


def write_eval_report(res: EvalResults, out_dir: str) -> str:
    """Write `<out_dir>/report.html` (results table, score vs step, parse rates, failures); return its HTML."""
    from core.evals.report import eval_report_html

    html = eval_report_html(res.summary, res.table, res.records)
    write_atomic(os.path.join(out_dir, "report.html"), html)
    return html
