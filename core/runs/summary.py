"""What a curation run did, proven from its ledgers: source accounting, per-step balance, known-bad recall,
and one sentence that says what happened (also for degenerate runs: empty source, everything quarantined).

Flyte-free; `tasks/run_report.py` wraps `write_run_summary` and `run_summary_decks`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from core.foundation.ledger import PASSING, LedgerError, StepBalance


def check_source_accounting(ingest_ledger_dir: str | os.PathLike, ingest_ledger: pd.DataFrame) -> dict[str, Any] | None:
    """Prove source records == ingest ledger rows == kept + quarantined, from the count ingest made of the raw
    source (`source_accounting.json`) and the ledger itself. Raises LedgerError on a mismatch; None when the
    run predates source accounting."""
    c = ingest_ledger["decision"].value_counts()
    return source_accounting(ingest_ledger_dir, len(ingest_ledger), int(c.get("keep", 0)), int(c.get("quarantine", 0)))


def source_accounting(ingest_ledger_dir: str | os.PathLike, rows: int, kept: int,
                      quarantined: int) -> dict[str, Any] | None:
    """`check_source_accounting` from the ingest ledger's counts (rows, kept, quarantined) rather than the ledger
    itself, so a streamed summary never holds the ledger."""
    from core.io.ingest import read_source_accounting

    acc = read_source_accounting(ingest_ledger_dir)
    if acc is None:
        return None
    ok = acc["source_records"] == rows == kept + quarantined and acc.get("balanced", False)
    out = {"source_records": int(acc["source_records"]), "ledger_rows": rows, "kept": kept,
           "quarantined": quarantined, "files": len(acc.get("files", [])), "balanced": bool(ok)}
    if not ok:
        raise LedgerError(f"source accounting: {acc['source_records']} records in the source, {rows} ingest ledger "
                          f"rows, {kept} kept + {quarantined} quarantined (per file: {acc.get('files')})")
    return out


def load_id_list(path: str) -> list[str]:
    """Known-bad ids (core.foundation.ids.load_id_list): a JSON list, an object's `bad` (else `ids`) list, Parquet
    `sample_id`, or one id per line."""
    from core.foundation.ids import load_id_list as load

    return load(path, key="bad")


def known_bad_recall(frames: Sequence[tuple[str, pd.DataFrame]], ids: Iterable[str]) -> list[dict[str, Any]]:
    """Per step, what happened to the known-bad ids: how many entered it, and how many it kept (or
    modified), dropped and quarantined; `removed` = dropped + quarantined and `recall` = removed / entered
    (the share of the known-bad ids reaching the step that it caught). `absent` counts ids the run never saw."""
    bad = set(ids)
    rows = [recall_row(step, df.loc[df["sample_id"].isin(bad), "decision"].value_counts(dropna=False).to_dict())
            for step, df in frames]
    if frames:
        rows[0]["absent"] = len(bad - set(frames[0][1]["sample_id"]))
    return rows


def recall_row(step: str, decisions: Mapping[str, int]) -> dict[str, Any]:
    """One step's row of `known_bad_recall` from the known-bad ids' decision counts at that step."""
    kept = int(sum(decisions.get(d, 0) for d in PASSING))
    dropped, quarantined = int(decisions.get("drop", 0)), int(decisions.get("quarantine", 0))
    entered = int(sum(decisions.values()))
    return {"step": step, "entered": entered, "kept": kept, "dropped": dropped, "quarantined": quarantined,
            "removed": dropped + quarantined,
            "recall": round((dropped + quarantined) / entered, 4) if entered else None}


def run_sentence(balance: Sequence[StepBalance], accounting: dict[str, Any] | None) -> str:
    """One sentence saying what the run did (also when it produced nothing, and why)."""
    if not balance:
        return "No step ran."
    first, last = balance[0], balance[-1]
    out = last.kept + last.modified
    src = f"{accounting['source_records']} source records" if accounting else f"{first.inputs} input records"
    if first.inputs == 0:
        return f"The source holds no records ({src}): nothing was curated; check the source path and format."
    passed0 = first.kept + first.modified
    if passed0 == 0:
        return (f"All {src} were quarantined at {first.step} ({first.quarantined} quarantined, {first.dropped} "
                f"dropped): nothing was curated; see the {first.step} reasons.")
    removed = [f"{b.step} -{b.dropped + b.quarantined}" for b in balance[1:] if b.dropped + b.quarantined]
    tail = f" ({', '.join(removed)})" if removed else ""
    return (f"{src} -> {passed0} passed {first.step} ({first.quarantined} quarantined) -> {out} samples out of "
            f"{last.step}{tail}; every record accounted for.")


def summarize(balance: Sequence[StepBalance], reasons: list[dict[str, Any]], accounting: dict[str, Any] | None,
              known_bad: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run summary dict (summary.json): steps, reasons, source accounting, known-bad recall, sentence."""
    last = balance[-1] if balance else None
    out = {"steps": [b.as_dict() for b in balance], "reasons": reasons, "balanced": True,
           "final_samples": int(last.kept + last.modified) if last else 0,
           "source_accounting": accounting, "sentence": run_sentence(balance, accounting)}
    if known_bad is not None:
        out["known_bad"] = known_bad
    return out


@dataclass
class RunReport:
    """What `write_run_summary` found: the summary dict (summary.json), per-step counts, decisions with a
    reason, the source accounting (None when ingest did not record it)."""

    summary: dict[str, Any]
    counts: pd.DataFrame
    reasons: pd.DataFrame
    accounting: dict[str, Any] | None


def write_run_summary(step_dirs: Sequence[str], steps: Sequence[str], out_dir: str,
                      known_bad: Sequence[str] | None = None) -> RunReport:
    """Prove the run's ledgers balance and write `<out_dir>/summary.json`, `counts.parquet` (per step), the
    merged ledger `ledger/<step>/part-*.parquet` (every step's rows, a Parquet dataset partitioned by step)
    and, for runs of at most `core.runs.ledger_stream.SINGLE_FILE_MAX_ROWS` rows, the same rows in `ledger.parquet`.

    Streams: each step's ledger is read batch by batch once (`core.runs.ledger_stream.merge_run_ledgers`), so memory
    stays flat whatever the sample count. Nothing is written when a check fails. Raises LedgerError when a step
    lost or duplicated a sample, or when the ingest ledger does not hold one row per record counted in the source.

    :param step_dirs: local output directories of the run's steps (each holds `ledger/<step>/`).
    :param steps: step names in pipeline order; source accounting is checked when the first is `ingest`.
    :param out_dir: where the files go (created).
    :param known_bad: ids of known low-quality samples: the summary reports, per step, what it did with them.
    """
    import shutil
    import tempfile

    from core.foundation.ledger import find_step_dir
    from core.runs.ledger_stream import merge_run_ledgers  # looked up per call (tests count calls)

    if not steps:
        raise ValueError("steps is empty: name the run's steps in pipeline order")
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".summary-")
    try:
        run = merge_run_ledgers(step_dirs, steps, staging, known_bad)
        balance = run.balance
        first = balance[0]
        accounting = (source_accounting(find_step_dir(step_dirs, steps[0]), first.inputs, first.kept,
                                        first.quarantined) if steps[0] == "ingest" else None)
        bad = None
        if known_bad is not None:
            per_step = [recall_row(s.balance.step, s.known_bad) for s in run.steps]
            per_step[0]["absent"] = run.known_bad_absent
            bad = {"n_ids": len(set(known_bad)), "per_step": per_step}
        summary = summarize(balance, run.reasons(), accounting, bad)
        reasons = pd.DataFrame(summary["reasons"], columns=["step", "decision", "reason", "count"])
        counts = pd.DataFrame([b.as_dict() for b in balance])
        run.publish(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts.to_parquet(os.path.join(out_dir, "counts.parquet"), index=False)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return RunReport(summary, counts, reasons, accounting)


def clear_published_ledger(output_dir: str) -> None:
    """Remove an earlier run's merged ledger (`ledger/` and `ledger.parquet`) from `output_dir` before a new
    summary is published there: publishing only adds and overwrites files, so a step partition or a single
    file that this run does not write would otherwise stay and mix two runs."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    if fs.exists(f"{root}/ledger"):
        fs.rm(f"{root}/ledger", recursive=True)
    if fs.exists(f"{root}/ledger.parquet"):
        fs.rm(f"{root}/ledger.parquet")


def run_summary_decks(rep: RunReport) -> list[tuple[str, str]]:
    """(deck name, HTML) of the run summary: what happened, source accounting, samples per step (table and
    plot), decisions with a reason, known-bad recall; plus one deck per step for the known-bad ids."""
    from core.foundation.report import figure_html, new_figure, page, table_html, text_html

    summary, counts, accounting = rep.summary, rep.counts, rep.accounting
    fig, ax = new_figure(7, 3.5)
    ax.bar(counts["step"], counts["inputs"], label="inputs", color="#ccc")
    ax.bar(counts["step"], counts["kept"] + counts["modified"], label="passed on", color="#4a8")
    ax.set_ylabel("samples")
    ax.legend()
    parts = [text_html(summary["sentence"], "what happened"),
             table_html([accounting] if accounting else [{"source_accounting": "not recorded by this ingest"}],
                        "source accounting (source records == ingest ledger rows == kept + quarantined)"),
             table_html(counts, "samples per step (inputs = kept + modified + dropped + quarantined)"),
             figure_html(fig, "samples through the pipeline"),
             table_html(rep.reasons, "decisions with a reason (dropped, quarantined, kept with a note)")]
    known_bad = summary.get("known_bad")
    if known_bad is not None:
        parts.append(table_html(known_bad["per_step"],
                                f"known-bad ids ({known_bad['n_ids']}): what each step did with them"))
    decks = [("run summary", page(*parts))]
    if known_bad is not None:  # one deck per step, so each step's effect on the known-bad ids reads on its own
        decks += [(f"known-bad: {row['step']}", page(table_html([row], f"known-bad ids at {row['step']}")))
                  for row in known_bad["per_step"]]
    return decks
