"""Resume checks of the rephrase step: the chunk files of a shard in flight are this run's, or nothing is reused.

A shard's work folder (`rephrase/work/<shard>/`) holds `stamp.json` (what makes its chunks: model and tokenizer
fingerprints, prompts, generation and validation settings, chunk size) and one file per finished chunk, named
by its position and a hash of its sample ids: `chunk-<i>-<ids hash>.json`. A resumed shard

- refuses when the stamp differs from the current config (the error names the fields), or throws the shard's
  chunks away and recomputes them when `on_config_change="recompute"`: two models' outputs are never mixed;
- reuses a chunk only when a file with the same position and the same ids exists, and publishes exactly the
  chunks of the current plan: a changed chunk size or input can neither drop nor duplicate a sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.foundation.fingerprint import describe_diff, diff_fields, dir_fingerprint
from core.foundation.step import write_atomic
from core.steps.rephrase.config import RephraseConfig

log = logging.getLogger(__name__)

STAMP = "stamp.json"
CHUNK_RE = re.compile(r"chunk-[0-9]{6}-[0-9a-f]{16}\.json")
# Settings that do not change a sample's rows: where and how fast it runs, and the report's example count.
# Batching is left out too: vLLM schedules a whole chunk, so its outputs never depended on a batch size.
NOT_STAMPED = ("device", "gpu_memory_utilization", "n_examples", "overlap_io", "batch_size", "tensor_parallel",
               "on_config_change", "model", "tokenizer")


class RephraseResumeError(ValueError):
    """A shard's finished chunks were made by another config; resuming would mix outputs or lose samples."""


def work_stamp(cfg: RephraseConfig) -> dict[str, Any]:
    """What the chunks of a shard depend on: the config fields that change rows, the model and tokenizer by
    fingerprint (paths change between task attempts; contents do not)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in NOT_STAMPED}
    d["model"] = dir_fingerprint(cfg.model)
    d["tokenizer"] = dir_fingerprint(cfg.tokenizer_path)
    return d


def chunk_name(index: int, ids: Sequence[str]) -> str:
    """`chunk-<index>-<16 hex of sha256 of the ids>.json`: names the exact samples the chunk holds."""
    h = hashlib.sha256("\0".join(ids).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"chunk-{index:06d}-{h}.json"


def prepare_work(work: Path, cfg: RephraseConfig) -> set[str]:
    """Check (or start) a shard's work folder; returns the names of the chunk files that may be reused.

    Raises RephraseResumeError naming the differing fields when the folder holds chunks made with another
    stamp (or chunks from before stamps existed), unless `cfg.on_config_change == "recompute"`, which
    empties the folder instead."""
    stamp = work_stamp(cfg)
    chunks = sorted(p.name for p in work.glob("chunk-*.json")) if work.is_dir() else []
    if chunks:
        f = work / STAMP
        recorded = json.loads(f.read_text("utf-8")) if f.is_file() else None
        legacy = [c for c in chunks if not CHUNK_RE.fullmatch(c)]
        diff = diff_fields(recorded, stamp) if recorded is not None else {}
        if recorded is None or legacy or diff:
            what = (describe_diff(diff) if diff else
                    f"{len(chunks)} chunk file(s) without a stamp or with old names, e.g. {(legacy or chunks)[0]}")
            if cfg.on_config_change != "recompute":
                raise RephraseResumeError(
                    f"{work} holds finished chunks made by another config ({what}); resuming would mix their "
                    f"outputs or lose samples. Set on_config_change='recompute' to redo this shard, or use a "
                    f"new output folder")
            log.warning("%s: chunks made by another config (%s) are discarded and recomputed", work, what)
            shutil.rmtree(work)
            chunks = []
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(work / STAMP, json.dumps(stamp, sort_keys=True))
    return set(chunks)
