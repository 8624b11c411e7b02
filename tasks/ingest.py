"""Ingest task: any input dialect (JSON/JSONL/WDS/Parquet; LLaVA or messages) -> WebDataset shards + the ingest ledger."""

from __future__ import annotations

import logging
import os

from flytekit import Deck, Resources, current_context, task
from flytekit.types.directory import FlyteDirectory

from core.io.ingest import IngestOptions, default_ingest_options
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import CPU_IMAGE
from tasks.paths import resume_key, step_workdir
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut

log = logging.getLogger(__name__)


def _deck(res, run_dir: str) -> None:
    import pandas as pd

    from core.foundation.ledger import read_ledger, step_dir
    from core.foundation.report import figure_html, new_figure, page, table_html
    from core.io.ingest import read_source_accounting

    led = read_ledger(step_dir(run_dir, "ingest"))
    acc = read_source_accounting(step_dir(run_dir, "ingest")) or {}
    reasons = led[led.decision == "quarantine"].groupby("reason").size().rename("count").reset_index()
    fig, ax = new_figure()
    ax.hist([s.n_samples for s in res.shards], bins=20)
    ax.set_xlabel("samples per shard")
    ax.set_ylabel("shards")
    shards = pd.DataFrame([{"shard": s.name, "samples": s.n_samples, "MB": s.n_bytes / 1e6, "sha256": s.sha256[:16]}
                           for s in res.shards])
    Deck("ingest", page(
        table_html([res.summary() | {"reasons": ", ".join(f"{k}={v}" for k, v in res.reasons.items())}], "summary"),
        table_html(acc.get("files", []), "source accounting: records counted in each file (without the parser) "
                                         "== ingest ledger rows"),
        table_html(reasons, "quarantined by reason"),
        figure_html(fig, "shard sizes"),
        table_html(shards, "shards"),
    ))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def fingerprint_source(source: str, image_root: str = "") -> str:
    """Fingerprint of a dataset's files for the cache key of the steps that read it (never cached itself).

    :param source: Dataset file or folder (path or URL).
    :param image_root: Its image folder (path or URL; empty: none).
    :return: sha256 hex of sizes/modification times (see core.io.ingest.source_fingerprint).
    """
    from core.io.ingest import source_fingerprint

    return source_fingerprint(source, image_root)


@task(container_image=CPU_IMAGE, cache=True, cache_version=task_version(__name__), enable_deck=True, deck_fields=DECK_FIELDS,
      requests=Resources(cpu="2", mem="4Gi"))
def ingest_dataset(
    source: str,
    image_root: str,
    config: IngestOptions = default_ingest_options(),
    source_fingerprint: str = "",
    format: str = "auto",
) -> StepOut:
    """Turn a conversation dataset into WebDataset shards and an ingest ledger.

    Every input record is either kept (written to a shard) or quarantined with a reason
    (corrupt_image, missing_image, role_broken, image_count_mismatch, unsupported_modality:video, ...); none
    is dropped silently: the records of the source are counted without the parser and must equal the
    ledger rows (`ledger/ingest/source_accounting.json`), else the task fails.

    :param source: Path, folder or glob (local or fsspec URL) of the dataset: a JSON array (.json, streamed),
        JSONL, WebDataset shards (.tar) or Parquet files (docs/ingest.md).
    :param image_root: Folder (path or URL) that the records' image names are relative to (images carried
        inside WDS members or Parquet cells need none).
    :param config: IngestOptions (core/io/ingest.py): shard size in samples and bytes, the bounds at the door, the
        image readers; on the CLI a partial JSON, e.g. `{"shard_max_samples": 100}`.
    :param source_fingerprint: `fingerprint_source(source, image_root)`: unused by the body, part of the cache
        key, so a cached ingest is not reused after the files at the same paths changed.
    :param format: `auto` (from the extension and each record), or a container `json|jsonl|wds|parquet`,
        a dialect `llava|messages`, or both (`jsonl:messages`).
    :return: StepOut "ingest", the run directory: `shards/*.tar`, `shards/manifest.json`, `ledger/ingest/`.
    """
    t0 = step_started("ingest", source=source, image_root=image_root, format=format)
    from core.io.ingest import ingest

    sf = None
    if config.partition_records > 0:
        # partitioned (docs/ingest.md): partitions are fan-out units (`config.fanout` workers: Ray actors in this
        # pod); a persistent step folder, so a retry redoes only the partitions without a ledger part
        sf = step_workdir("ingest", resume_key("ingest_dataset", task_version(__name__), source=source,
                                               image_root=image_root, config=config,
                                               source_fingerprint=source_fingerprint, format=format))
        run_dir = sf.path
    else:  # one pass, rewritten whole by a retry
        run_dir = os.path.join(current_context().working_directory, "run")
    cfg = config.ingest_config(source, image_root, run_dir, format=format)
    res = ingest(cfg)
    log.info("ingest: %s", res.summary())
    _deck(res, run_dir)
    save_decks(run_dir, "ingest")
    if sf is not None:
        run_dir = sf.close()
    step_finished("ingest", t0, run_dir)
    return StepOut("ingest", FlyteDirectory(run_dir))
