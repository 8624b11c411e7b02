"""Run summary task: prove the ledgers balance across all steps, and show per-step counts in a deck."""

from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

from flytekit import Deck, Resources, current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from tasks.decks import display_root, save_decks
from tasks.images import CPU_IMAGE
from tasks.paths import source
from tasks.steplog import step_finished, step_started

log = logging.getLogger(__name__)


@task(container_image=CPU_IMAGE, enable_deck=True, requests=Resources(cpu="1", mem="2Gi"))
def summarize_run(
    step_dirs: List[FlyteDirectory],
    steps: List[str],
    export: Optional[FlyteDirectory] = None,
    output_dir: str = "",
    known_bad_ids: Optional[FlyteFile] = None,
) -> FlyteDirectory:
    """Check that every sample is accounted for exactly once per step and report what each step did.

    Fails loudly (LedgerError) when a step lost or duplicated a sample, or when the ingest ledger does not
    hold one row per record counted in the source (source records == ledger rows == kept + quarantined).

    :param step_dirs: Output directories of the run's steps (each holds `ledger/<step>/`).
    :param steps: Step names in pipeline order (e.g. ingest, embed, semdedup, perplexity, ppl_filter).
    :param export: The export step's output (shards + manifest), copied to `output_dir` when given.
    :param output_dir: Optional path/URL to publish the run to: `summary.json`, `ledger/` of every step,
        and `export/` (the curated WebDataset).
    :param known_bad_ids: Optional file of sample ids known to be low quality (JSON list, {"ids": [...]}, or one
        per line): the summary and the deck report, per step, how many of them it kept, dropped, quarantined.
    :return: Directory with summary.json, counts.parquet, the merged ledger (ledger.parquet) and decks/
        (every step's deck page, `<step>.html`, plus run_summary.html).

    Ends by printing where the summary, the export and each step's deck are (under `output_dir` when given).
    """
    t0 = step_started("summary", steps=",".join(steps))
    import fsspec
    import pandas as pd

    from core.ledger import check_balance, find_step_dir, read_ledger
    from core.report import DECKS_DIR, collect_decks, figure_html, new_figure, page, paths_block, table_html, text_html
    from core.run_summary import check_source_accounting, load_id_list, summarize

    bad_ids = load_id_list(known_bad_ids.download()) if known_bad_ids is not None else None
    dirs = [d.download() for d in step_dirs]
    balance = check_balance(dirs, steps)
    frames = [(s, read_ledger(find_step_dir(dirs, s))) for s in steps]
    accounting = check_source_accounting(find_step_dir(dirs, steps[0]), frames[0][1]) if steps[0] == "ingest" else None
    summary = summarize(frames, balance, accounting, bad_ids)
    ledger = pd.concat([df for _, df in frames], ignore_index=True)
    reasons = pd.DataFrame(summary["reasons"], columns=["step", "decision", "reason", "count"])
    counts = pd.DataFrame([b.as_dict() for b in balance])
    out = os.path.join(current_context().working_directory, "run_summary")
    os.makedirs(out, exist_ok=True)
    counts.to_parquet(os.path.join(out, "counts.parquet"), index=False)
    ledger.to_parquet(os.path.join(out, "ledger.parquet"), index=False)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

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
             table_html(reasons, "decisions with a reason (dropped, quarantined, kept with a note)")]
    if bad_ids is not None:
        parts.append(table_html(summary["known_bad"]["per_step"],
                                f"known-bad ids ({summary['known_bad']['n_ids']}): what each step did with them"))
    Deck("run summary", page(*parts))
    if bad_ids is not None:  # one deck per step, so each step's effect on the known-bad ids reads on its own
        for row in summary["known_bad"]["per_step"]:
            Deck(f"known-bad: {row['step']}", page(table_html([row], f"known-bad ids at {row['step']}")))
    decks = list(collect_decks(dirs, os.path.join(out, DECKS_DIR))) + ["run_summary"]
    save_decks(out, "run_summary")
    if output_dir:
        fs, root = fsspec.core.url_to_fs(output_dir)
        fs.makedirs(root, exist_ok=True)
        fs.put(out + "/", root.rstrip("/") + "/", recursive=True)
        if export is not None:
            fs.put(export.download().rstrip("/") + "/", root.rstrip("/") + "/export/", recursive=True)
        log.info("published run summary%s to %s", " and export" if export is not None else "", output_dir)
    log.info("run balanced over %s: %s", steps, summary["sentence"])
    print(summary["sentence"])
    step_finished("summary", t0, samples_out=summary["final_samples"])
    where = display_root(output_dir) if output_dir else out
    rows = [("run summary", f"{where}/summary.json"), ("ledger", f"{where}/ledger.parquet")]
    if export is not None:
        rows.append(("export", f"{where}/export" if output_dir else source(export)))
    rows += [(f"deck {name}", f"{where}/{DECKS_DIR}/{name}.html") for name in decks]
    print(paths_block(f"run finished: {summary['final_samples']} samples out; outputs:", rows), flush=True)
    return FlyteDirectory(out)
