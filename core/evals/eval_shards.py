"""Eval sets as WebDataset shards, so they can be embedded like training data (mining, decontamination).

Each benchmark's items (loaded from its cache by the benchmark's own loader, `core.evals.base`) become
LLaVA samples: one human turn with one `<image>` per image and the question, one gpt turn with the
ground truth as text. They are written to `<out>/shards/<benchmark>-NNNNNN.tar` (the shard prefix names
the benchmark, which is how `eval_embedding_sets` later splits the embed output per benchmark) with an
`ingest`-style ledger `<out>/ledger/ingest/part-evalsets.parquet`: `keep` per written item, `quarantine`
with the loader's reason for rows that could not be loaded (never dropped silently). The embed step
then takes `<out>` as both its shards and its upstream ledger.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from core.foundation.ledger import LedgerWriter, step_dir
from core.foundation.sample import IMAGE_TOKEN, Sample, SampleError
from core.io.images import decode_image, image_ext
from core.io.wds import ShardWriter

log = logging.getLogger(__name__)
LEDGER_PART = "part-evalsets.parquet"
_SHARD_RE = re.compile(r"^(?P<bench>[A-Za-z0-9_]+)-\d{6}$")


def _answer_text(target) -> str:
    return target if isinstance(target, str) else json.dumps(target, sort_keys=True, ensure_ascii=False)


def eval_item_sample(benchmark: str, item) -> Sample:
    """An EvalItem as a validated training-schema Sample (`source` = the benchmark)."""
    exts = [image_ext(b) for b in item.images]
    rec = {
        "id": item.id,
        "image": [f"{item.id}_{i}.{e}" for i, e in enumerate(exts)],
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n" * len(item.images) + item.question.replace(IMAGE_TOKEN, "")},
            {"from": "gpt", "value": _answer_text(item.target)},
        ],
        "source": benchmark,
    }
    s = Sample.from_record(rec)
    s.image_bytes = list(item.images)
    return s


def write_eval_shards(
    cache_dir: str, benchmarks: Sequence[str], out_dir: str, max_items: int = 0, shard_max_samples: int = 1000
) -> dict[str, dict[str, int]]:
    """Write each benchmark's items under `out_dir/shards/` and the ledger; return per-benchmark counts.

    :param cache_dir: root of the benchmark caches (`<cache_dir>/<benchmark>/...`, see docs/evals.md).
    :param benchmarks: benchmark names (`core.evals.registry.benchmark_names()`).
    :param out_dir: receives `shards/<benchmark>-NNNNNN.tar` and `ledger/ingest/`.
    :param max_items: items per benchmark (0 = all).
    :param shard_max_samples: items per shard.
    """
    from core.evals.base import LoadFailure
    from core.evals.registry import get_benchmark

    for b in benchmarks:
        if not _SHARD_RE.match(f"{b}-000000"):
            raise ValueError(f"benchmark name {b!r} must match [A-Za-z0-9_]+ (it becomes a shard prefix)")
    counts: dict[str, dict[str, int]] = {}
    out = out_dir.rstrip("/")
    with LedgerWriter(step_dir(out, "ingest") / LEDGER_PART, "ingest") as led:
        for b in benchmarks:
            c = counts.setdefault(b, {"items": 0, "kept": 0, "quarantined": 0})
            with ShardWriter(f"{out}/shards", b, shard_max_samples) as w:
                for item in get_benchmark(b).load(f"{cache_dir.rstrip('/')}/{b}"):
                    if max_items and c["items"] >= max_items:
                        break
                    c["items"] += 1
                    if isinstance(item, LoadFailure):
                        led.add(item.id, "quarantine", item.reason, benchmark=b)
                        c["quarantined"] += 1
                        continue
                    try:
                        if item.id in led.decided:
                            raise SampleError("duplicate_id", f"eval id {item.id!r} seen earlier")
                        for data in item.images:
                            decode_image(data)
                        s = eval_item_sample(b, item)
                    except (SampleError, ValueError) as e:
                        reason = e.reason if isinstance(e, SampleError) else "invalid_eval_item"
                        led.add(item.id if item.id not in led.decided else f"{item.id}#dup", "quarantine", reason,
                                benchmark=b, detail=str(e)[:300])
                        c["quarantined"] += 1
                        continue
                    led.add(s.id, "keep", shard=w.write(s), benchmark=b)
                    c["kept"] += 1
            log.info("eval set %s: %s", b, c)
    return counts


def eval_embedding_sets(embed_dir: str) -> dict[str, list[str]]:
    """Split an embed output of `write_eval_shards` shards into {benchmark: [embedding Parquet files]}.

    The embed step names its files after the shards (`embed/<benchmark>-NNNNNN.parquet`); files whose
    name does not follow that pattern raise, so a wrong directory is never read as an eval set.
    """
    root = Path(embed_dir)
    root = root / "embed" if (root / "embed").is_dir() else root
    sets: dict[str, list[str]] = {}
    for f in sorted(root.glob("*.parquet")):
        m = _SHARD_RE.match(f.stem)
        if not m:
            raise ValueError(f"{f}: not an eval-set embedding file (<benchmark>-NNNNNN.parquet)")
        sets.setdefault(m.group("bench"), []).append(str(f))
    if not sets:
        raise FileNotFoundError(f"no eval-set embedding files under {root}")
    return sets
