"""Eval mining (k nearest training samples per eval item) and decontamination (drop training samples
that are near-duplicates of eval items), with faiss inner-product search on normalized vectors.

Training embeddings are streamed one Parquet file (shard) at a time, so memory is one shard plus the
eval sets. `DecontamStep` is a `core.foundation.step.ShardStep` whose units are embeddings files: one ledger part per
file, finished files skipped on re-run (but still mined).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.foundation.ledger import LedgerWriter
from core.foundation.step import Passing, ShardStep, StepSummary, Unit, write_parquet_atomic
from core.steps.dedup.config import DecontamConfig
from core.steps.dedup.embeddings import embedding_files, invalid_rows, normalize_rows, read_embeddings

log = logging.getLogger(__name__)
DECONTAM_STEP = "decontam"


def _flat_ip(x: np.ndarray, gpu: bool = False):
    """Exact inner-product index over normalized rows; on all GPUs when enabled and faiss has GPU support."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def _use_gpu(device: str) -> bool:
    import faiss

    from core.steps.dedup.semdedup import resolve_device

    if resolve_device(device) != "cuda":
        return False
    if faiss.get_num_gpus() == 0:
        log.warning("device=cuda but this faiss build has no GPU support: searching on CPU")
        return False
    return True


class NeighbourMiner:
    """Running top-k training neighbours of each eval item across streamed training blocks."""

    def __init__(self, eval_ids: list[str], eval_x: np.ndarray, k: int, gpu: bool = False):
        import faiss

        self.eval_ids = list(eval_ids)
        self.q = normalize_rows(self.eval_ids, eval_x)
        self.k = k
        self.heap = faiss.ResultHeap(len(self.eval_ids), k, keep_max=True)
        self.train_ids: list[str] = []
        self.gpu = gpu

    def add(self, train_ids: list[str], train_x_normalized: np.ndarray) -> None:
        """Search one block of normalized training vectors."""
        if len(train_ids) == 0:
            return
        kk = min(self.k, len(train_ids))
        d, i = _flat_ip(train_x_normalized, self.gpu).search(self.q, kk)
        if kk < self.k:  # pad so the heap always gets k columns
            d = np.pad(d, ((0, 0), (0, self.k - kk)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, self.k - kk)), constant_values=-1)
        off = len(self.train_ids)
        self.heap.add_result(np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + off, -1).astype(np.int64))
        self.train_ids.extend(train_ids)

    def result(self, benchmark: str) -> pa.Table:
        """Rows (benchmark, eval_id, rank, sample_id, similarity), best first per eval item."""
        self.heap.finalize()
        d, i = self.heap.D, self.heap.I
        rows = {"benchmark": [], "eval_id": [], "rank": [], "sample_id": [], "similarity": []}
        for q, eid in enumerate(self.eval_ids):
            for r in range(self.k):
                if i[q, r] < 0:
                    continue
                rows["benchmark"].append(benchmark)
                rows["eval_id"].append(eid)
                rows["rank"].append(r)
                rows["sample_id"].append(self.train_ids[i[q, r]])
                rows["similarity"].append(float(d[q, r]))
        return pa.table(rows, schema=MINED_SCHEMA)


MINED_SCHEMA = pa.schema(
    [("benchmark", pa.string()), ("eval_id", pa.string()), ("rank", pa.int64()), ("sample_id", pa.string()),
     ("similarity", pa.float32())]
)


def mine_neighbours(
    eval_ids: list[str], eval_x: np.ndarray, train_ids: list[str], train_x: np.ndarray, k: int, benchmark: str
) -> pa.Table:
    """k nearest training samples (cosine) of each eval item, in memory."""
    miner = NeighbourMiner(eval_ids, eval_x, k)
    miner.add(list(train_ids), normalize_rows(list(train_ids), train_x))
    return miner.result(benchmark)


def max_eval_similarity(
    train_x_normalized: np.ndarray, evals: dict[str, np.ndarray], batch_size: int = 65_536, gpu: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per training row: (max similarity over all eval sets, benchmark index of it, eval row of it)."""
    n = train_x_normalized.shape[0]
    best = np.full(n, -np.inf, np.float32)
    which = np.full(n, -1, np.int64)
    row = np.full(n, -1, np.int64)
    for b, ex in enumerate(evals.values()):
        index = _flat_ip(ex, gpu)
        for s in range(0, n, batch_size):
            d, i = index.search(np.ascontiguousarray(train_x_normalized[s : s + batch_size]), 1)
            d, i = d[:, 0], i[:, 0]
            upd = d > best[s : s + batch_size]
            best[s : s + batch_size][upd] = d[upd]
            which[s : s + batch_size][upd] = b
            row[s : s + batch_size][upd] = i[upd]
    return best, which, row


class DecontamStep(ShardStep):
    """Per embeddings file: drop training samples more similar than `cfg.threshold` to an eval item, while
    mining the k nearest training samples of every eval item over all files (finished ones included).

    Ledger rows: drop `eval_contamination:<benchmark>` (score = max similarity, extra = nearest eval id);
    keep (score, nearest eval id and benchmark); quarantine of invalid vectors; keep
    `decontam_skipped:no_<kind>_embedding` for samples without an embedding of `cfg.kind`; ids of `prev`
    in no file: quarantine `missing_embedding`. `run` publishes `mining/<benchmark>.parquet` at the end."""

    name = DECONTAM_STEP
    stamp_attrs = ("cfg", "eval_embeddings")  # resume only against the same eval sets (core/foundation/step.py stamp)
    missing_reason = "missing_embedding"
    missing_detail = "input id has no row in any embeddings file"

    def __init__(self, out: str | os.PathLike, eval_embeddings: dict[str, str | list[str]], cfg: DecontamConfig,
                 prev: Passing | None = None):
        super().__init__(out, prev)
        for b in eval_embeddings:
            if not b or ":" in b:
                raise ValueError(f"benchmark name {b!r} must be non-empty without ':'")
        self.eval_embeddings, self.cfg = eval_embeddings, cfg
        self.counts = {"n_input": 0, "n_dropped": 0, "n_quarantined": 0, "by_benchmark": {b: 0 for b in eval_embeddings}}

    def unit_name(self, url: str) -> str:
        return Path(url).stem

    def setup(self) -> None:
        """Eval sets (normalized) and one running top-k miner per benchmark."""
        self.gpu = _use_gpu(self.cfg.device)
        self.evals_ids: dict[str, list[str]] = {}
        self.evals_x: dict[str, np.ndarray] = {}
        for b, p in self.eval_embeddings.items():
            es = read_embeddings(p, self.cfg.kind)
            if es.missing:  # e.g. text-only eval items under kind=image: they cannot match by that modality
                log.warning("%s: %d eval items have no %s embedding and are not used, e.g. %s", b, len(es.missing),
                            self.cfg.kind, es.missing[:5])
            self.evals_ids[b], self.evals_x[b] = es.ids, normalize_rows(es.ids, es.matrix)
        self.miners = {b: NeighbourMiner(self.evals_ids[b], self.evals_x[b], self.cfg.k, self.gpu)
                       for b in self.eval_embeddings}

    def _mine(self, unit: Unit):
        """Read one file's input rows, add its valid normalized vectors to every miner."""
        es = read_embeddings(unit.url, self.cfg.kind, self.include)
        bad = invalid_rows(es.ids, es.matrix)
        ok = np.array([i not in bad for i in es.ids], bool)
        ids = np.asarray(es.ids, dtype=object)[ok].astype(str).tolist() if es.ids else []
        x = normalize_rows(ids, es.matrix[ok], inplace=True) if ids else np.zeros((0, 1), np.float32)
        for m in self.miners.values():
            m.add(ids, x)
        return es, bad, ids, x

    def visit_finished(self, unit: Unit) -> None:
        self.ensure_setup()  # mining needs every file, also ones whose ledger part already exists
        self._mine(unit)

    def process(self, unit: Unit, led: LedgerWriter) -> None:
        es, bad, ids, x = self._mine(unit)
        cfg, names, c = self.cfg, list(self.eval_embeddings), self.counts
        best, which, row = max_eval_similarity(x, self.evals_x, cfg.batch_size, self.gpu) if ids else (np.zeros(0),) * 3
        shard_of = dict(zip(es.ids, es.shards))
        for sid, sh in zip(es.missing, es.missing_shards):
            led.add(sid, "keep", f"decontam_skipped:no_{cfg.kind}_embedding", None, sh)
        for sid, why in sorted(bad.items()):
            led.add(sid, "quarantine", why, None, shard_of[sid])
            c["n_quarantined"] += 1
        for j, sid in enumerate(ids):
            b = names[which[j]]
            near = self.evals_ids[b][row[j]]
            if best[j] > cfg.threshold:
                led.add(sid, "drop", f"eval_contamination:{b}", float(best[j]), shard_of[sid], eval_id=near)
                c["n_dropped"] += 1
                c["by_benchmark"][b] += 1
            else:
                led.add(sid, "keep", "", float(best[j]), shard_of[sid], eval_id=near, benchmark=b)
        c["n_input"] += len(es.ids) + len(es.missing)

    def run(self, urls: Sequence[str]) -> StepSummary:
        self.ensure_setup()  # the eval sets are checked and mined even when no file is left to decide
        summary = super().run(urls)
        self.counts["n_quarantined"] += summary.missing
        for b, m in self.miners.items():
            write_parquet_atomic(m.result(b), self.out / "mining" / f"{b}.parquet")
        return summary


def decontaminate(
    embeddings_dir: str | os.PathLike | list[str | os.PathLike],
    run_dir: str | os.PathLike,
    eval_embeddings: dict[str, str | list[str]],
    cfg: DecontamConfig,
    prev: Passing | None = None,
) -> dict:
    """Mine and decontaminate against several eval sets in one streamed pass over training embeddings files.

    eval_embeddings: {benchmark: path (or list of files) of that eval set's embeddings, same Parquet format}.
    `prev`: the previous step's passing ids (None = every embedded sample). Writes
    `<run>/mining/<benchmark>.parquet` (k nearest training samples per eval item, with similarities) and
    `<run>/ledger/decontam/part-<file>.parquet` (see `DecontamStep`); finished files keep their ledger part
    on re-run. Returns counts (n_input, n_dropped, n_quarantined, by_benchmark) of the files decided now.
    """
    step = DecontamStep(run_dir, eval_embeddings, cfg, prev)
    step.run([str(f) for f in embedding_files(embeddings_dir)])
    return step.counts
