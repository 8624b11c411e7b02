"""The rephrase step: streaming, chunk-resumable turn-level rephrasing of shards, on `core.foundation.step.ShardStep`.

Layout inside the step's output directory (see docs/architecture.md):

    ledger/rephrase/part-<shard>.parquet      decision per sample: modify (accepted) or keep (+ reason);
                                              the reader's quarantines of the shard in the same part
    rephrase/records/part-<shard>.parquet     sample_id, conversations_json of accepted samples (export input)
    rephrase/examples/part-<shard>.jsonl      a few before/after examples (accepted and rejected)
    rephrase/work/<shard>/stamp.json          what made the chunks (config fields, model/tokenizer fingerprints)
    rephrase/work/<shard>/chunk-<i>-<h>.json  finished chunks of the shard in flight, named by position and ids
                                              hash (removed once published; see core/steps/rephrase/resume.py)

A shard is processed in chunks of `chunk_size` samples in reader order (`core.steps.rephrase.chunks`); every
finished chunk is written atomically, so a crash loses at most one chunk. When all chunks of a shard are
done, the records and examples are published, then the ledger part (the base publishes it last). A re-run
skips shards whose ledger part exists and, inside the shard in flight, chunks already on disk. The per-shard work is `core.steps.rephrase.shard`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from core.foundation.ledger import LedgerWriter
from core.foundation.log import progress
from core.foundation.sample import Sample, Turn
from core.foundation.step import Passing, ShardStep, StepSummary, Unit, write_parquet_atomic
from core.steps.rephrase.config import RephraseConfig
from core.steps.rephrase.generate import Generator
from core.steps.rephrase.shard import RECORDS_SCHEMA, ShardSummary, publish_shard, rephrase_shard
from core.steps.rephrase.similarity import SimilarityScorer
from core.steps.rephrase.tokens import TokenCounter

log = logging.getLogger(__name__)

STEP = "rephrase"
__all__ = ["RECORDS_SCHEMA", "STEP", "RephraseStep", "ShardSummary", "read_rephrased", "rephrase_shards"]


class RephraseStep(ShardStep):
    """Rephrase every sample of each shard (restricted to `prev`'s ids) with `cfg`'s model.

    `generator`, `counter`, `scorer` are built from `cfg` in `setup` when not given, so a finished run
    loads no model. `StepSummary.results[shard]` is the shard's `ShardSummary`."""

    name = STEP
    stamp_ignore = ShardStep.stamp_ignore | {"on_config_change"}  # what to do on a change, not what is made

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
        self.on_mismatch = cfg.on_config_change  # one switch for finished shards (stamp) and chunks in flight
        self.generator, self.counter, self.scorer = generator, counter, scorer
        self.bar: Any = None
        self._published: list[str] = []  # units whose chunk files go once their ledger part exists

    @property
    def work(self) -> Path:
        return self.out / STEP / "work"

    def setup(self) -> None:
        from core.foundation.configs import override
        from core.io.fetch import local_dir
        from core.steps.rephrase.generate import make_generator

        # an actor on a worker pod gets URLs for the model and tokenizer (the driver's paths are on another node)
        cfg = override(self.cfg, model=local_dir(self.cfg.model), tokenizer=local_dir(self.cfg.tokenizer))
        self.generator = self.generator or make_generator(cfg)
        self.counter = self.counter or TokenCounter(cfg.tokenizer_path)
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
        summary = rephrase_shard(self.samples(unit, led), self.work / unit.name, self.cfg, self.generator,
                                 self.counter, self.scorer, self.bar)
        publish_shard(summary, self.work / unit.name, self.out / STEP, self.cfg, led)
        self._published.append(unit.name)
        return summary

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
