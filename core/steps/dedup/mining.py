"""Eval mining (k nearest training samples per eval item) and decontamination (drop training samples
that are near-duplicates of eval items), with faiss inner-product search on normalized vectors.

Training embeddings are streamed one Parquet file (shard) at a time, so memory is one shard plus the
eval sets. `DecontamStep` is a `core.foundation.step.ShardStep` whose units are embeddings files: one ledger part per
file, finished files skipped on re-run. It runs in this process or over Ray workers (`DecontamConfig.fanout`,
core/runs/fanout.py). Mining is a reduce over per-unit statistics: each unit publishes the top-k neighbours of
every eval item among its own rows (`mining_parts/part-<unit>.parquet`, before its ledger part), and the driver
merges those parts in unit order into `mining/<benchmark>.parquet`, reading no embeddings: the leading finished
units as they are announced (while the workers go on with later ones), the rest in `finish`. The same bytes
whatever the number of workers, and the same as one streamed pass over every file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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

    if device != "cuda" and faiss.get_num_gpus() == 0:  # a CPU faiss build searches on CPU whatever torch sees:
        return False  # no torch import (~2 s of CPU per worker process) to learn it
    if resolve_device(device) != "cuda":
        return False
    if faiss.get_num_gpus() == 0:
        log.warning("device=cuda but this faiss build has no GPU support: searching on CPU")
        return False
    return True


def add_block(heap, d: np.ndarray, ids: np.ndarray, k: int) -> None:
    """Merge one block's (n_eval, kk) results into a running `faiss.ResultHeap`, padded to k columns (-inf, -1).
    `ids` must grow with the block order (ties are broken by id): a streamed pass and a merge of per-unit parts
    that number rows in the same order keep the same neighbours."""
    kk = d.shape[1]
    if kk < k:  # pad so the heap always gets k columns
        d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
    heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(ids, np.int64))


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

    def search(self, train_x_normalized: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The k best rows of one block for every eval item: (similarities, row indices in the block), shape
        (n_eval, min(k, rows)), best first (a row index is -1 where faiss found none)."""
        kk = min(self.k, len(train_x_normalized))
        return _flat_ip(train_x_normalized, self.gpu).search(self.q, kk)

    def add(self, train_ids: list[str], train_x_normalized: np.ndarray) -> None:
        """Search one block of normalized training vectors."""
        if len(train_ids) == 0:
            return
        d, i = self.search(train_x_normalized)
        off = len(self.train_ids)
        add_block(self.heap, d, np.where(i >= 0, i + off, -1), self.k)
        self.train_ids.extend(train_ids)

    def result(self, benchmark: str) -> pa.Table:
        """Rows (benchmark, eval_id, rank, sample_id, similarity), best first per eval item."""
        self.heap.finalize()
        return mined_table(benchmark, self.eval_ids, self.heap.D, self.heap.I, self.train_ids.__getitem__)


def mined_table(benchmark: str, eval_ids: list[str], d: np.ndarray, i: np.ndarray, sample_id) -> pa.Table:
    """The mining table of one benchmark from a finalized heap (d, i: (n_eval, k), best first); `sample_id(i)`
    names a heap id; empty slots (id -1) are left out. Rows by eval item, then rank."""
    i = np.asarray(i)
    q, r = np.nonzero(i >= 0)  # row-major: eval item by eval item, rank by rank
    return pa.table({"benchmark": pa.array([benchmark] * len(q), pa.string()),
                     "eval_id": pa.array(np.asarray(eval_ids, dtype=object)[q], pa.string()),
                     "rank": pa.array(r, pa.int64()),
                     "sample_id": pa.array([sample_id(g) for g in i[q, r].tolist()], pa.string()),
                     "similarity": pa.array(np.asarray(d, np.float32)[q, r], pa.float32())},
                    schema=MINED_SCHEMA)


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


# ---- mining as a reduce over per-unit parts ----------------------------------------------------------------
MINING_PARTS = "mining_parts"  # <out>/mining_parts/part-<unit>.parquet: one unit's top-k per eval item
PART_SCHEMA = pa.schema(
    [("benchmark", pa.string()), ("eval_row", pa.int32()), ("rank", pa.int32()), ("row", pa.int64()),
     ("sample_id", pa.string()), ("similarity", pa.float32())]
)
_UNIT_SHIFT = 32  # heap id of a part row = (unit position << 32) | row in the unit: grows in the streamed order


def mining_part(miners: dict[str, NeighbourMiner], ids: list[str], x: np.ndarray) -> pa.Table:
    """One unit's mining statistics: per benchmark and eval item, the unit's min(k, rows) best rows as faiss
    returns them (row = position among the unit's valid rows, -1 where none; the float32 similarity as is)."""
    cols: dict[str, list] = {f.name: [] for f in PART_SCHEMA}
    if ids:
        id_arr = np.asarray(ids, dtype=object)
        for b, m in miners.items():
            d, i = m.search(x)
            nq, kk = d.shape
            row = i.ravel()
            cols["benchmark"].append(np.full(nq * kk, b, dtype=object))
            cols["eval_row"].append(np.repeat(np.arange(nq, dtype=np.int32), kk))
            cols["rank"].append(np.tile(np.arange(kk, dtype=np.int32), nq))
            cols["row"].append(row.astype(np.int64))
            cols["sample_id"].append(np.where(row >= 0, id_arr[np.maximum(row, 0)], None))
            cols["similarity"].append(d.ravel().astype(np.float32))
    return pa.table({f.name: pa.array(np.concatenate(cols[f.name]) if cols[f.name] else [], f.type)
                     for f in PART_SCHEMA}, schema=PART_SCHEMA)


def read_part(path: str | os.PathLike) -> pa.Table:
    """A mining part with its string columns as dictionary codes (a part repeats each of its unit's ids up to
    n_eval x k times; `MiningMerge.add` needs the codes, and names only the rows that enter a heap)."""
    return pq.read_table(path, read_dictionary=["benchmark", "sample_id"])


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list]:
    """(int64 code per row, -1 for null; the distinct values) of a string column, plain or dictionary-encoded."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    codes = pc.fill_null(arr.indices.cast(pa.int64()), -1).to_numpy()
    return codes, arr.dictionary.to_pylist()


class MiningMerge:
    """The reduce of the mining parts: one running top-k heap per benchmark, fed the parts in unit order.

    Memory: the heaps (n_eval x k) and the sample ids they hold, whatever the number of units. The heaps get
    the same (similarity, id) blocks in the same order as one `NeighbourMiner` streamed over every file, with
    ids in the same order, so the result is the same, ties included."""

    def __init__(self, eval_ids: dict[str, list[str]], k: int):
        import faiss

        self.eval_ids, self.k = eval_ids, k
        self.heaps = {b: faiss.ResultHeap(len(ids), k, keep_max=True) for b, ids in eval_ids.items()}
        self.names: dict[str, dict[int, str]] = {b: {} for b in eval_ids}  # heap id -> sample id, live ones only
        self.n_units = 0

    def add(self, part: pa.Table, unit: str = "") -> None:
        """Merge the next unit's part (see `mining_part`; `read_part` reads one with its strings as dictionary
        codes, so a part of n_eval x k rows costs no per-row string)."""
        u, self.n_units = self.n_units, self.n_units + 1
        if part.num_rows == 0:
            return
        part = part.unify_dictionaries().combine_chunks()  # one chunk, one dictionary per column (no-op: plain)
        bench_codes, bench_names = _codes(part.column("benchmark"))
        id_codes, id_names = _codes(part.column("sample_id"))
        cols = {c: part.column(c).to_numpy() for c in ("eval_row", "rank", "row", "similarity")}
        for b, heap in self.heaps.items():
            if b not in bench_names:
                continue
            sel = np.flatnonzero(bench_codes == bench_names.index(b))
            nq = len(self.eval_ids[b])
            kk = len(sel) // max(nq, 1)
            er, rk = cols["eval_row"][sel], cols["rank"][sel]
            in_order = (kk * nq == len(sel) and (er == np.repeat(np.arange(nq, dtype=er.dtype), kk)).all()
                        and (rk == np.tile(np.arange(kk, dtype=rk.dtype), nq)).all())
            order = sel if in_order else sel[np.lexsort((rk, er))]  # `mining_part` writes them in order
            if nq == 0 or kk * nq != len(order) or not (cols["rank"][order].reshape(nq, kk) == np.arange(kk)).all():
                raise ValueError(f"mining part {unit!r}: {len(order)} rows for {b!r} do not fit {nq} eval items "
                                 f"(made with other eval sets? the step stamp should have refused)")
            row = cols["row"][order]
            gid = np.where(row >= 0, (u << _UNIT_SHIFT) | row, -1).reshape(nq, kk)
            add_block(heap, cols["similarity"][order].reshape(nq, kk), gid, self.k)
            self._name(b, u, row, id_codes[order], id_names)

    def _name(self, b: str, u: int, row: np.ndarray, id_codes: np.ndarray, id_names: list) -> None:
        """Remember the sample ids of unit `u`'s rows that entered the heap of `b` (`id_codes[j]`: the index in
        `id_names` of the sample id of part row j, whose unit row is `row[j]`); forget evicted ones now and then
        (the map stays within a few heaps' size)."""
        heap, names = self.heaps[b], self.names[b]
        live = heap.I.ravel()
        new = live[(live >= 0) & ((live >> _UNIT_SHIFT) == u)] & ((1 << _UNIT_SHIFT) - 1)  # unit rows, repeated
        if len(new):
            ok = np.flatnonzero(row >= 0)
            code_of = np.full(int(row[ok].max()) + 1, -1, np.int64)  # unit row -> its sample id's code
            code_of[row[ok]] = id_codes[ok]
            taken = np.zeros(len(code_of), bool)
            taken[new] = True
            rows = np.flatnonzero(taken)
            names.update(zip(((u << _UNIT_SHIFT) | rows).tolist(), (id_names[c] for c in code_of[rows].tolist())))
        if len(names) > 4 * live.size + 1024:
            keep = set(live.tolist())
            self.names[b] = {g: s for g, s in names.items() if g in keep}

    def result(self, benchmark: str) -> pa.Table:
        """The mining table of `benchmark` (as `NeighbourMiner.result`)."""
        heap = self.heaps[benchmark]
        heap.finalize()
        return mined_table(benchmark, self.eval_ids[benchmark], heap.D, heap.I, self.names[benchmark].__getitem__)


class DecontamStep(ShardStep):
    """Per embeddings file: drop training samples more similar than `cfg.threshold` to an eval item, and publish
    the file's mining part (its k nearest rows of every eval item); `finish` merges the parts of every file
    (finished ones included) into `mining/<benchmark>.parquet`.

    Ledger rows: drop `eval_contamination:<benchmark>` (score = max similarity, extra = nearest eval id);
    keep (score, nearest eval id and benchmark); quarantine of invalid vectors; keep
    `decontam_skipped:no_<kind>_embedding` for samples without an embedding of `cfg.kind`; ids of `prev`
    in no file: quarantine `missing_embedding`. `process` returns the unit's counts (`decontam_counts`)."""

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
        self._seen: list[Unit] = []  # every unit of this run in input order (processed or finished): the reduce's
        self._published: set[str] = set()  # units whose mining part is on disk (finished before, or announced)
        self._merge: MiningMerge | None = None  # the reduce's merge, fed the leading published units as they come
        self._merged = 0  # how many of `_seen` it holds

    def unit_name(self, url: str) -> str:
        return Path(url).stem

    def mining_part_path(self, unit_name: str) -> Path:
        return self.out / MINING_PARTS / f"part-{unit_name}.parquet"

    def setup(self) -> None:
        """Eval sets (normalized) and one top-k searcher per benchmark."""
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

    def clear_outputs(self) -> None:
        super().clear_outputs()
        for f in [*(self.out / MINING_PARTS).glob("*.parquet"), *(self.out / "mining").glob("*.parquet")]:
            f.unlink()

    def _read(self, unit: Unit):
        """One file's input rows: (embeddings, invalid rows, valid ids, their normalized vectors)."""
        es = read_embeddings(unit.url, self.cfg.kind, self.include)
        bad = invalid_rows(es.ids, es.matrix)
        ok = np.array([i not in bad for i in es.ids], bool)
        ids = np.asarray(es.ids, dtype=object)[ok].astype(str).tolist() if es.ids else []
        x = normalize_rows(ids, es.matrix[ok], inplace=True) if ids else np.zeros((0, 1), np.float32)
        return es, bad, ids, x

    def pending(self, urls: Sequence[str]) -> tuple[list[Unit], list[Unit]]:
        """The base's split; also remembers every unit in input order for the reduce (`run` and the fan-out's
        driver both call it once with all the units; finished ones need no visit: `finish` reads their parts)."""
        self._seen = self.units(urls)
        todo, finished = super().pending(urls)
        self._published, self._merge, self._merged = {u.name for u in finished}, None, 0
        return todo, finished

    def prepare_reduce(self) -> None:
        """The fan-out's driver loads the eval sets and opens the merge while its actors start."""
        self.ensure_setup()
        if self._seen:
            self._open_merge()

    def _open_merge(self) -> MiningMerge:
        """The reduce's merge, opened (eval sets loaded) on first use."""
        if self._merge is None:
            self.ensure_setup()
            self._merge = MiningMerge(self.evals_ids, self.cfg.k)
        return self._merge

    def unit_published(self, unit_name: str) -> None:
        """Also feed the merge every part it can take now: the driver merges the leading finished units (in
        input order) while the actors work on later ones, so `finish` is left with little to merge."""
        super().unit_published(unit_name)
        self._published.add(unit_name)
        self._merge_parts()

    def _merge_parts(self, every: bool = False) -> None:
        """Merge the parts of `_seen[_merged:]` in input order up to the first unit not yet published (`every`:
        all of them; a lost part of a finished unit is rebuilt from its file)."""
        if not self._seen:  # an actor announcing its own units, or no `pending` yet: nothing to merge here
            return
        merge = self._open_merge()
        while self._merged < len(self._seen):
            unit = self._seen[self._merged]
            if not every and unit.name not in self._published:
                return
            p = self.mining_part_path(unit.name)
            if not p.exists():
                log.warning("%s: unit %s is finished but its mining part is gone: rebuilding it from %s", self.name,
                            unit.name, unit.url)
                _, _, ids, x = self._read(unit)
                write_parquet_atomic(mining_part(self.miners, ids, x), p)
            merge.add(read_part(p), unit.name)
            self._merged += 1

    def process(self, unit: Unit, led: LedgerWriter) -> dict:
        es, bad, ids, x = self._read(unit)
        write_parquet_atomic(mining_part(self.miners, ids, x), self.mining_part_path(unit.name))  # before the part
        cfg, names = self.cfg, list(self.eval_embeddings)
        c = {"n_input": len(es.ids) + len(es.missing), "n_dropped": 0, "n_quarantined": 0,
             "by_benchmark": {b: 0 for b in names}}
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
        return c

    def finish(self, n_units: int) -> int:
        """The reduce: missing ids (the base's), then the mining parts of every unit, in input order, merged
        into `mining/<benchmark>.parquet`. Reads the eval sets and the parts, never the training embeddings
        (but rebuilds a finished unit's part from its file when the part was lost)."""
        missing = super().finish(n_units)
        if len(self._seen) != n_units:
            raise RuntimeError(f"{self.name}: the reduce knows {len(self._seen)} of {n_units} units (`pending` lists "
                               "them before `finish`)")
        self.ensure_setup()  # the eval sets are checked and named even when no file was left to decide
        self._merge_parts(every=True)
        merge = self._open_merge()  # no unit at all: empty tables
        self._seen, self._published, self._merge, self._merged = [], set(), None, 0
        for b in self.eval_embeddings:
            write_parquet_atomic(merge.result(b), self.out / "mining" / f"{b}.parquet")
        return missing


def decontam_counts(summary: StepSummary, benchmarks: Sequence[str]) -> dict:
    """The step's counts of the units decided now (n_input, n_dropped, n_quarantined, by_benchmark) from a
    `StepSummary` (the per-unit counts `DecontamStep.process` returned, and the missing ids)."""
    out = {"n_input": 0, "n_dropped": 0, "n_quarantined": summary.missing, "by_benchmark": {b: 0 for b in benchmarks}}
    for c in summary.results.values():
        for k in ("n_input", "n_dropped", "n_quarantined"):
            out[k] += c[k]
        for b, n in c["by_benchmark"].items():
            out["by_benchmark"][b] += n
    return out


def decontaminate(
    embeddings_dir: str | os.PathLike | list[str | os.PathLike],
    run_dir: str | os.PathLike,
    eval_embeddings: dict[str, str | list[str]],
    cfg: DecontamConfig,
    prev: Passing | None = None,
) -> dict:
    """Mine and decontaminate against several eval sets in one streamed pass over training embeddings files,
    in this process or over `cfg.fanout.workers` Ray workers (core/runs/fanout.py `run_fanout`).

    eval_embeddings: {benchmark: path (or list of files) of that eval set's embeddings, same Parquet format}.
    `prev`: the previous step's passing ids (None = every embedded sample). Writes
    `<run>/mining/<benchmark>.parquet` (k nearest training samples per eval item, with similarities),
    `<run>/mining_parts/part-<file>.parquet` (each file's share of it) and
    `<run>/ledger/decontam/part-<file>.parquet` (see `DecontamStep`); finished files keep their ledger part
    on re-run. Returns counts (n_input, n_dropped, n_quarantined, by_benchmark) of the files decided now.
    """
    from core.runs.fanout import StepSpec, run_fanout

    spec = StepSpec(DecontamStep, (str(run_dir), eval_embeddings, cfg), {"prev": prev})
    summary = run_fanout(spec, [str(f) for f in embedding_files(embeddings_dir)], cfg.fanout)
    return decontam_counts(summary, list(eval_embeddings))
