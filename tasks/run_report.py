"""Run summary task: prove the ledgers balance across all steps, show per-step counts in a deck, and write the
run report `decks/index.html` beside every step's own page."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, List, Optional

from flytekit import Deck, Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.runs.config import CurateConfig
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import CPU_IMAGE
from tasks.paths import source, workdir
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut

if TYPE_CHECKING:
    from core.runs.summary import RunReport

log = logging.getLogger(__name__)


@task(container_image=CPU_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, requests=Resources(cpu="1", mem="2Gi"))
def summarize_run(
    steps: List[StepOut],
    output_dir: str = "",
    known_bad_ids: Optional[FlyteFile] = None,
    config: Optional[CurateConfig] = None,
) -> FlyteDirectory:
    """Check that every sample is accounted for exactly once per step and report what each step did.

    Fails loudly (LedgerError) when a step lost or duplicated a sample, or when the ingest ledger does not
    hold one row per record counted in the source (source records == ledger rows == kept + quarantined).

    :param steps: The run's step outputs in pipeline order (ingest, embed, semdedup, perplexity, ppl_filter, ...,
        export), each holding `ledger/<step>/`; the export step's folder (shards + manifest) is copied to
        `output_dir` when given.
    :param output_dir: Optional path/URL to publish the run to: `summary.json`, `ledger/` of every step,
        and `export/` (the curated WebDataset).
    :param known_bad_ids: Optional file of sample ids known to be low quality (JSON list, {"ids": [...]}, or one
        per line): the summary and the deck report, per step, how many of them it kept, dropped, quarantined.
    :param config: The run's config, shown on the run report page (decks/index.html).
    :return: Directory with summary.json, counts.parquet, the merged ledger (`ledger/<step>/part-*.parquet`, a
        dataset partitioned by step; also `ledger.parquet`, one file, for runs up to 1Mi ledger rows) and decks/
        (every step's deck page, `<step>.html`, run_summary.html, and the run report index.html linking them).
        Streams: memory does not grow with the run.

    Ends by printing where the summary, the export and each step's deck are (under `output_dir` when given),
    the run report last.
    """
    if not steps:
        raise ValueError("summarize_run needs the run's step outputs (at least ingest)")
    names = [s.step for s in steps]
    t0 = step_started("summary", steps=",".join(names))
    from core.foundation.report import DECKS_DIR, collect_decks, paths_block
    from core.io.publish import display_root, publish
    from core.runs.index import INDEX_PAGE
    from core.runs.summary import clear_published_ledger, load_id_list, run_summary_decks, write_run_summary

    bad_ids = load_id_list(known_bad_ids.download()) if known_bad_ids is not None else None
    dirs = [s.dir.download() for s in steps]
    export = next((s.dir for s in steps if s.step == "export"), None)
    out = str(workdir("run_summary"))
    rep = write_run_summary(dirs, names, out, bad_ids)
    for name, html in run_summary_decks(rep):
        Deck(name, html)
    decks = list(collect_decks(dirs, os.path.join(out, DECKS_DIR))) + ["run_summary"]
    save_decks(out, "run_summary")
    write_index(out, rep, decks, config)
    if output_dir:
        clear_published_ledger(output_dir)  # no step partition of an earlier run into the same folder stays
        publish(out, output_dir, {"export": export.download()} if export is not None else None)
    summary = rep.summary
    log.info("run balanced over %s: %s", names, summary["sentence"])
    print(summary["sentence"])
    step_finished("summary", t0, samples_out=summary["final_samples"])
    where = display_root(output_dir) if output_dir else out
    single = os.path.exists(os.path.join(out, "ledger.parquet"))  # big runs: the partitioned dataset only
    rows = [("run summary", f"{where}/summary.json"), ("ledger", f"{where}/ledger.parquet" if single else f"{where}/ledger/")]
    if export is not None:
        rows.append(("export", f"{where}/export" if output_dir else source(export)))
    rows += [(f"deck {name}", f"{where}/{DECKS_DIR}/{name}.html") for name in decks]
    rows.append(("run report", f"{where}/{DECKS_DIR}/{INDEX_PAGE}.html"))
    print(paths_block(f"run finished: {summary['final_samples']} samples out; outputs:", rows), flush=True)
    return FlyteDirectory(out)


def code_version() -> dict[str, str]:
    """What code made the run: the package version, the git commit when run from a checkout, and the hash of
    the curate workflow's import closure and pins (`tasks.cache.task_version`, the same code hash that keys
    the task caches; it exists in a container without git too)."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    from tasks.cache import ROOT, task_version

    out = {"code_hash": task_version("workflows.curate")}
    try:
        out = {"mmcurate": version("mmcurate"), **out}
    except PackageNotFoundError:
        pass
    try:
        out["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # not a checkout (a container): the code hash says it
        pass
    return out


def write_index(out: str, rep: RunReport, pages: List[str], config: Optional[CurateConfig]) -> str:
    """Write the run report `<out>/decks/index.html` (core/runs/index.py) linking `pages` beside it."""
    from dataclasses import asdict

    from core.foundation.report import DECKS_DIR
    from core.runs.index import INDEX_PAGE, run_index_html

    path = os.path.join(out, DECKS_DIR, f"{INDEX_PAGE}.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_index_html(rep.summary, rep.counts, rep.reasons, pages,
                               asdict(config) if config is not None else None, code_version()))
    return path
