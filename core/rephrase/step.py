"""The rephrase step: streaming, chunk-resumable turn-level rephrasing of shards, on `core.step.ShardStep`.

Layout inside the step's output directory (see docs/architecture.md):

    ledger/rephrase/part-<shard>.parquet      decision per sample: modify (accepted) or keep (+ reason);
                                              the reader's quarantines of the shard in the same part
    rephrase/records/part-<shard>.parquet     sample_id, conversations_json of accepted samples (export input)
    rephrase/examples/part-<shard>.jsonl      a few before/after examples (accepted and rejected)
    rephrase/work/<shard>/chunk-<i>.json      finished chunks of the shard in flight (removed once published)

A shard is processed in chunks of `chunk_size` samples in reader order (`core.rephrase.chunks`); every
finished chunk is written atomically, so a crash loses at most one chunk. When all chunks of a shard are
done, the records and examples are published, then the ledger part (the base publishes it last). A re-run
skips shards whose ledger part exists and, inside the shard in flight, chunks already on disk.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.ledger import LedgerWriter
from core.log import progress
from core.rephrase.chunks import finish_chunk, generate_chunk, pick_examples, prepare_chunk
from core.rephrase.config import RephraseConfig
from core.rephrase.generate import Generator
from core.rephrase.similarity import SimilarityScorer
from core.rephrase.tokens import TokenCounter
from core.sample import Sample, Turn
from core.step import Passing, ShardStep, StepSummary, Unit, write_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

STEP = "rephrase"
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


class RephraseStep(ShardStep):
    """Rephrase every sample of each shard (restricted to `prev`'s ids) with `cfg`'s model.

    `generator`, `counter`, `scorer` are built from `cfg` in `setup` when not given, so a finished run
    loads no model. `StepSummary.results[shard]` is the shard's `ShardSummary`."""

    name = STEP

    def __init__(
        self,
        out: str | os.PathLike,
        cfg: RephraseConfig,
        prev: Passing | None = None,
        generator: Generator | None = None,
        counter: TokenCounter | None = None,
        scorer: SimilarityScorer | None = None,
    ):
        super().__init__(out, prev)
        self.cfg = cfg
        self.generator, self.counter, self.scorer = generator, counter, scorer
        self.bar: Any = None
        self._published: list[str] = []  # units whose chunk files go once their ledger part exists

    @property
    def work(self) -> Path:
        return self.out / STEP / "work"

    def setup(self) -> None:
        from core.rephrase.generate import make_generator

        self.generator = self.generator or make_generator(self.cfg)
        self.counter = self.counter or TokenCounter(self.cfg.tokenizer_path)
        if self.scorer is None and self.cfg.similarity_model:
            self.scorer = SimilarityScorer(self.cfg.similarity_model, device=self.cfg.device)

    def run(self, urls: Sequence[str]) -> StepSummary:
        total = len(self.prev) if self.prev is not None else None
        self.bar = progress(desc="rephrase", total=total, unit="sample")
        try:
            return super().run(urls)
        finally:
            self.bar.close()

    def samples(self, unit: Unit, led: LedgerWriter) -> Iterator[Sample]:
        """The shard's samples in reader order (text only: images are not decoded)."""
        return self.read(unit, led)

    def process(self, unit: Unit, led: LedgerWriter) -> ShardSummary:
        self._tidy()
        t_start = time.perf_counter()
        summary = ShardSummary(unit.name)
        cfg, work = self.cfg, self.work / unit.name
        work.mkdir(parents=True, exist_ok=True)
        done = {int(p.stem.split("-")[1]) for p in work.glob("chunk-*.json")}
        it = iter(self.samples(unit, led))

        def finish(ci: int, chunk: list[Sample], plans: list, gens: list) -> None:
            rows = finish_chunk(chunk, plans, gens, self.counter, cfg, self.scorer)
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
                    if self.bar is not None:
                        self.bar.update(len(chunk))
                    if ci in done:
                        summary.chunks_resumed += 1
                        continue
                    plans, requests, seeds = prepare_chunk(chunk, cfg)
                    gens, t_gen = generate_chunk(self.generator, requests, seeds)
                    summary.seconds_generate += t_gen
                    log.info("rephrase %s chunk %d: %d samples, %.1fs generating", unit.name, ci, len(chunk), t_gen)
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
        self._publish(unit.name, work, led, summary)
        summary.seconds_total = time.perf_counter() - t_start
        log.info("rephrase %s: %d samples, %d modified, reasons %s", unit.name, summary.n_samples,
                 summary.n_modified, summary.reasons)
        return summary

    def _publish(self, shard: str, work: Path, led: LedgerWriter, summary: ShardSummary) -> None:
        """Records and examples of the finished chunks, then the decisions into `led` (published last)."""
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
        write_parquet_atomic(table, self.out / STEP / "records" / f"part-{shard}.parquet")
        examples = pick_examples(rows, self.cfg.n_examples)
        write_atomic(self.out / STEP / "examples" / f"part-{shard}.jsonl",
                     "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        for r in rows:
            old, new = r["old_tokens"], r["new_tokens"]
            led.add(r["sample_id"], r["decision"], r["reason"], score=(new / old) if old else 1.0,
                    shard=r["shard"] or shard, old_tokens=old, new_tokens=new, gen_tokens=r["gen_tokens"])
            summary.reasons[r["reason"]] = summary.reasons.get(r["reason"], 0) + 1
        summary.n_samples = len(rows)
        summary.n_modified = len(accepted)
        self._published.append(shard)

    def _tidy(self) -> None:
        """Remove the chunk files of shards whose ledger part is published (then `rephrase/work/` if empty)."""
        for shard in self._published:
            if self.is_done(shard):
                shutil.rmtree(self.work / shard, ignore_errors=True)
        self._published = [s for s in self._published if not self.is_done(s)]
        try:
            self.work.rmdir()
        except OSError:
            pass

    def visit_finished(self, unit: Unit) -> None:
        self._published.append(unit.name)  # chunk files left by a crash after the part was published

    def finish(self, n_units: int) -> int:
        self._tidy()
        if n_units == 0 and not (self.out / STEP / "records").is_dir():  # a degenerate run: empty records too
            write_parquet_atomic(RECORDS_SCHEMA.empty_table(), self.out / STEP / "records" / "part-empty.parquet")
        return super().finish(n_units)


class _InMemory(RephraseStep):
    """RephraseStep over shards given as (name, open samples) pairs instead of WDS files."""

    def __init__(self, shards: Sequence[tuple[str, Callable[[], Iterable[Sample]]]], *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.open = dict(shards)

    def unit_name(self, url: str) -> str:
        return url

    def samples(self, unit: Unit, led: LedgerWriter) -> Iterator[Sample]:
        return iter(self.open[unit.name]())


def rephrase_shards(
    shards: Sequence[tuple[str, Callable[[], Iterable[Sample]]]],
    out_dir: str | os.PathLike,
    cfg: RephraseConfig,
    generator: Generator,
    counter: TokenCounter | None = None,
    scorer: SimilarityScorer | None = None,
) -> StepSummary:
    """`RephraseStep` over samples already in memory (tests, benchmarks): `shards` pairs a shard name with a
    function that opens its samples (called only for shards not finished yet)."""
    step = _InMemory(shards, out_dir, cfg, generator=generator, counter=counter, scorer=scorer)
    return step.run([name for name, _ in shards])


def read_rephrased(run_dir: str | os.PathLike) -> dict[str, list[Turn]]:
    """All accepted rephrasings of a run: sample id -> new conversation (for the export step)."""
    out: dict[str, list[Turn]] = {}
    for p in sorted((Path(run_dir) / STEP / "records").glob("part-*.parquet")):
        t = pq.read_table(p)
        for sid, conv in zip(t.column("sample_id").to_pylist(), t.column("conversations_json").to_pylist()):
            out[sid] = [Turn(d["from"], d["value"]) for d in json.loads(conv)]
    return out
