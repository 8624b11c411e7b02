"""Export task: the curated samples of a run -> training-schema WebDataset shards + manifest."""

from __future__ import annotations

import logging
import os
from typing import List, Optional

from flytekit import Deck, Resources, current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.steps.export import ExportConfig, default_export_config
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import CPU_IMAGE
from tasks.paths import resume_key, source, step_url, step_workdir
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut

log = logging.getLogger(__name__)


def _local_ledgers(src: str, dst: str) -> str:
    """A local copy of `src/ledger` (small: one Parquet table per step) inside `dst`; returns `dst`."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(src)
    if isinstance(fs, LocalFileSystem):
        return root
    if fs.exists(f"{root}/ledger"):
        fs.get(f"{root}/ledger/", os.path.join(dst, "ledger") + "/", recursive=True)
    return dst


def _rephrased_records(d: FlyteDirectory) -> str:
    """Accept the rephrase step's whole output dir (records live in `rephrase/records/`) or the records dir."""
    import fsspec

    src = source(d).rstrip("/")
    fs, root = fsspec.core.url_to_fs(src)
    return f"{src}/rephrase/records" if fs.isdir(f"{root}/rephrase/records") else src


@task(container_image=CPU_IMAGE, cache=True, cache_version=task_version(__name__), enable_deck=True, deck_fields=DECK_FIELDS,
      requests=Resources(cpu="2", mem="8Gi"))
def export_dataset(
    run: StepOut,
    steps: Optional[List[StepOut]] = None,
    subset_ids: Optional[FlyteFile] = None,
    subset_name: str = "",
    rephrased: Optional[StepOut] = None,
    config: ExportConfig = default_export_config(),
) -> StepOut:
    """Export the curated samples of a run as WebDataset shards in the training schema.

    Keeps exactly the samples that passed the last step (or the given subset), byte-identical for the same
    inputs, and checks the exported count against the ledger (the task fails on a mismatch).

    :param run: The ingest output (StepOut "ingest"): `shards/*.tar` and `ledger/ingest/`.
    :param steps: The later steps' outputs in pipeline order (embed, semdedup, perplexity, ...); the last one decides
        what is kept. Empty: only the ingest ledger.
    :param subset_ids: Export exactly these sample ids instead (text: one per line, JSON list, or Parquet `sample_id`).
    :param subset_name: Name of the subset, recorded in the manifest (e.g. `ppl_decile_3`).
    :param rephrased: The rephrase step's output (its `rephrase/records/`: Parquet files sample_id,
        conversations_json) whose conversations replace the originals.
    :param config: ExportConfig (core/steps/export.py): `max_samples` and `max_bytes` per output shard, `image_format`
        jpg (default: every single-image sample is `key.jpg`, non-JPEG sources re-encoded at quality 95) | png
        (lossless, `key.png`) | keep (source bytes and extension); its `steps` and `subset_name` come from the inputs.
    :return: StepOut "export": a directory with `shards/<kind>/*.tar` (kinds text, image, images<n>), `README.md` (dataset card),
        `manifest.json` (ids, counts, sha256 per shard, removals) and `ledger/export/`.
    """
    t0 = step_started("export", subset=subset_name or "-", max_samples=config.max_samples)
    from core.foundation.configs import override
    from core.foundation.step import shards_of
    from core.steps.export import export_curated, export_report_html, load_id_list

    names = [run.step] + [s.step for s in steps or []]
    cfg = override(config, steps=names if steps else None, subset_name=subset_name)  # validates before any download
    work = current_context().working_directory
    src = source(run.dir)
    dirs = [_local_ledgers(src, os.path.join(work, "run"))]
    for i, d in enumerate(steps or []):
        dirs.append(_local_ledgers(source(d.dir), os.path.join(work, f"step{i}")))
    ids = None
    if subset_ids is not None:
        ids = load_id_list(subset_ids.download())
    key = resume_key("export_dataset", task_version(__name__), run=run, steps=steps, subset_ids=subset_ids,
                     subset_name=subset_name, rephrased=rephrased, config=config)
    sf = None
    if cfg.partition_shards:
        # partitioned (docs/export.md): units of `partition_shards` input shards, each its own output shards, over
        # `fanout` workers (Ray actors in this pod); the step folder (a local mirror of a URL root, each unit
        # pushed as it finishes) resumes unit by unit
        sf = step_workdir("export", key)
        out = sf.path
    else:
        # this call's persistent folder (path or URL; export builds it whole): a retry after the export finished
        # reuses it (`finished_export`); an unfinished export is rewritten whole (its output shards span input shards)
        out = step_url("export", key)
    manifest = export_curated(shards_of(src), dirs, out, cfg, subset_ids=ids,
                              rephrased_dir=_rephrased_records(rephrased.dir) if rephrased is not None else None,
                              code_version=task_version(__name__), source=src, resume=True)
    log.info("exported %d samples in %d shards", manifest["n_samples"], manifest["n_shards"])
    Deck("export", export_report_html(manifest))
    save_decks(out, f"export_{subset_name}" if subset_name else "export")
    if sf is not None:
        out = sf.close()
    step_finished("export", t0, out, shards=manifest["n_shards"])
    return StepOut("export", FlyteDirectory(out))
