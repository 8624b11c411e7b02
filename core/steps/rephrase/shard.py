"""Rephrasing one shard: the chunk loop (resumable, validation overlapped with generation) and the shard's
published outputs. `core.steps.rephrase.step.RephraseStep` runs it per unit; the per-chunk work is in
`core.steps.rephrase.chunks`.
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

from core.foundation.ledger import LedgerWriter
from core.foundation.sample import Sample
from core.foundation.step import write_atomic, write_parquet_atomic
from core.steps.rephrase.chunks import finish_chunk, generate_chunk, pick_examples, prepare_chunk
from core.steps.rephrase.config import RephraseConfig
from core.steps.rephrase.generate import Generator
from core.steps.rephrase.resume import chunk_name, prepare_work
from core.steps.rephrase.similarity import SimilarityScorer
from core.steps.rephrase.tokens import TokenCounter

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
    chunks: list[str] = field(default_factory=list, repr=False)  # this run's chunk files, in order


def rephrase_shard(
    samples: Iterable[Sample],
    work: Path,
    cfg: RephraseConfig,
    generator: Generator,
    counter: TokenCounter,
    scorer: SimilarityScorer | None,
    bar: Any = None,
) -> ShardSummary:
    """Rephrase a shard's samples chunk by chunk into `work/chunk-<i>-<ids hash>.json` (each written atomically;
    a chunk whose file is there is skipped, so a crash loses at most the chunk in flight). The work folder is
    checked first (`core.steps.rephrase.resume.prepare_work`): chunks of another config are refused or recomputed,
    never mixed in. Returns the shard's summary."""
    t_start = time.perf_counter()
    summary = ShardSummary(work.name)
    reusable = prepare_work(work, cfg)
    it = iter(samples)

    def finish(name: str, chunk: list[Sample], plans: list, gens: list) -> None:
        rows = finish_chunk(chunk, plans, gens, counter, cfg, scorer)
        write_atomic(work / name, json.dumps(rows, ensure_ascii=False))
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
                name = chunk_name(ci, [s.id for s in chunk])
                summary.chunks.append(name)
                if name in reusable:
                    summary.chunks_resumed += 1
                    continue
                plans, requests, seeds = prepare_chunk(chunk, cfg)
                gens, t_gen = generate_chunk(generator, requests, seeds)
                summary.seconds_generate += t_gen
                log.info("rephrase %s chunk %d: %d samples, %.1fs generating", work.name, ci, len(chunk), t_gen)
                if pending is not None:
                    pending.result()
                if cfg.overlap_io:
                    pending = pool.submit(finish, name, chunk, plans, gens)
                else:
                    pending = None
                    finish(name, chunk, plans, gens)
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
    for name in summary.chunks:  # exactly this run's plan: a chunk file of another plan is never read
        rows.extend(json.loads((work / name).read_text("utf-8")))
    stale = sorted({p.name for p in work.glob("chunk-*.json")} - set(summary.chunks))
    if stale:
        log.warning("rephrase %s: %d chunk file(s) of another plan ignored: %s", shard, len(stale), stale[:3])
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
