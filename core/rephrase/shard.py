"""Rephrasing one shard: the chunk loop (resumable, validation overlapped with generation) and the shard's
published outputs. `core.rephrase.step.RephraseStep` runs it per unit; the per-chunk work is in
`core.rephrase.chunks`.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.ledger import LedgerWriter
from core.rephrase.chunks import finish_chunk, generate_chunk, pick_examples, prepare_chunk
from core.rephrase.config import RephraseConfig
from core.rephrase.generate import Generator
from core.rephrase.similarity import SimilarityScorer
from core.rephrase.tokens import TokenCounter
from core.sample import Sample
from core.step import write_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

RECORDS_SCHEMA = pa.schema([("sample_id", pa.string()), ("conversations_json", pa.string())])


@dataclass
class ShardSummary:
    """What the rephrasing of one shard did (timings cover this call only, not resumed chunks)."""

    shard: str
    n_samples: int = 0
    n_modified: int = 0
    chunks_done: int = 0
    chunks_resumed: int = 0
    seconds_total: float = 0.0
    seconds_generate: float = 0.0
    generated_tokens: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def rephrase_shard(
    samples: Iterable[Sample],
    work: Path,
    cfg: RephraseConfig,
    generator: Generator,
    counter: TokenCounter,
    scorer: SimilarityScorer | None,
    bar: Any = None,
) -> ShardSummary:
    """Rephrase a shard's samples chunk by chunk into `work/chunk-<i>.json` (each written atomically; chunks
    already there are skipped, so a crash loses at most the chunk in flight). Returns the shard's summary."""
    t_start = time.perf_counter()
    summary = ShardSummary(work.name)
    work.mkdir(parents=True, exist_ok=True)
    done = {int(p.stem.split("-")[1]) for p in work.glob("chunk-*.json")}
    it = iter(samples)

    def finish(ci: int, chunk: list[Sample], plans: list, gens: list) -> None:
        rows = finish_chunk(chunk, plans, gens, counter, cfg, scorer)
        write_atomic(work / f"chunk-{ci:06d}.json", json.dumps(rows, ensure_ascii=False))
        summary.chunks_done += 1
        summary.generated_tokens += sum(r["gen_tokens"] for r in rows)

    # Validation and I/O of chunk k run in a worker thread while chunk k+1 generates (vLLM's engine
    # and torch kernels release the GIL). A failed generation waits for the chunk being finished, so
    # a crash still loses only the chunk in flight.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = None
        try:
            for ci in itertools.count():
                chunk = list(itertools.islice(it, cfg.chunk_size))
                if not chunk:
                    break
                if bar is not None:
                    bar.update(len(chunk))
                if ci in done:
                    summary.chunks_resumed += 1
                    continue
                plans, requests, seeds = prepare_chunk(chunk, cfg)
                gens, t_gen = generate_chunk(generator, requests, seeds)
                summary.seconds_generate += t_gen
                log.info("rephrase %s chunk %d: %d samples, %.1fs generating", work.name, ci, len(chunk), t_gen)
                if pending is not None:
                    pending.result()
                if cfg.overlap_io:
                    pending = pool.submit(finish, ci, chunk, plans, gens)
                else:
                    pending = None
                    finish(ci, chunk, plans, gens)
        finally:
            if pending is not None:
                wait([pending])
        if pending is not None:
            pending.result()
    summary.seconds_total = time.perf_counter() - t_start
    return summary


def publish_shard(summary: ShardSummary, work: Path, step_out: Path, cfg: RephraseConfig, led: LedgerWriter) -> None:
    """Records and examples of the shard's finished chunks under `step_out` (`<out>/rephrase/`), then every
    decision into `led` (the ledger part, which the step base publishes last)."""
    t0 = time.perf_counter()
    shard = summary.shard
    rows: list[dict[str, Any]] = []
    for p in sorted(work.glob("chunk-*.json")):
        rows.extend(json.loads(p.read_text("utf-8")))
    accepted = [r for r in rows if r["decision"] == "modify"]
    table = pa.Table.from_pydict(
        {
            "sample_id": [r["sample_id"] for r in accepted],
            "conversations_json": [json.dumps(r["candidate"], ensure_ascii=False) for r in accepted],
        },
        schema=RECORDS_SCHEMA,
    )
    write_parquet_atomic(table, step_out / "records" / f"part-{shard}.parquet")
    examples = pick_examples(rows, cfg.n_examples)
    write_atomic(step_out / "examples" / f"part-{shard}.jsonl",
                 "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    for r in rows:
        old, new = r["old_tokens"], r["new_tokens"]
        led.add(r["sample_id"], r["decision"], r["reason"], score=(new / old) if old else 1.0,
                shard=r["shard"] or shard, old_tokens=old, new_tokens=new, gen_tokens=r["gen_tokens"])
        summary.reasons[r["reason"]] = summary.reasons.get(r["reason"], 0) + 1
    summary.n_samples = len(rows)
    summary.n_modified = len(accepted)
    summary.seconds_total += time.perf_counter() - t0
    log.info("rephrase %s: %d samples, %d modified, reasons %s", shard, summary.n_samples, summary.n_modified,
             summary.reasons)
