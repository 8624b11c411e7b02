"""A whole run's ledgers, streamed: the per-step balance proof, decision counts, reasons and known-bad hits
computed batch by batch, and the merged ledger written as a Parquet dataset partitioned by step.

Memory is bounded by the batch size and the id-bucket size, not by the number of samples: the exact balance
proof (no id decided twice; step k's ids == step k-1's passing ids) spills ids to disk in hash buckets and
compares one bucket at a time. pyarrow only (already a dependency): Parquet batch scans via `pyarrow.dataset`,
Arrow IPC for the spill, `pq.ParquetWriter` for the merged files.

Output of `merge_run_ledgers(step_dirs, steps, out)`:
- `out/ledger/<step>/part-NNNNN.parquet`: the merged ledger, one folder per step (the run layout, so
  `read_ledger(out/"ledger")`, `pyarrow.dataset.dataset(out/"ledger")` and DuckDB globs all read it);
- `out/ledger.parquet`: the same rows in one file when the run has at most `single_file_max_rows` rows. It is
  byte-identical to what pandas wrote before (`pd.concat(frames).to_parquet(index=False)`) up to
  `row_group_rows` rows (one row group); above that its row groups are `row_group_rows` long instead of 1Mi.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from core.foundation.ledger import PASSING, SCHEMA, LedgerError, StepBalance, find_step_dir, ledger_files

BATCH_ROWS = 65_536  # rows per scanned batch
BUCKET_ROWS = 262_144  # ids per spill bucket: what the balance proof holds in memory at once (x2)
ROW_GROUP_ROWS = 131_072  # merged-ledger row group (the pandas writer used one 1Mi-row group)
PART_MAX_ROWS = 4 << 20  # rows per merged-ledger part file of one step
SINGLE_FILE_MAX_ROWS = 1 << 20  # ledger.parquet (one file) is written up to this many rows in all
N_EXAMPLES = 5  # ids quoted in a LedgerError
# the dataset parts dictionary-encode only the columns with few distinct values (ids and extras are mostly
# unique: building their dictionary costs time, then falls back to plain); ledger.parquet keeps pandas' defaults
DICTIONARY_COLUMNS = ["step", "decision", "reason", "shard"]


def iter_ledger_batches(path: str | os.PathLike, columns: Sequence[str] | None = None,
                        batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The rows of a ledger (file or directory) as record batches of about `batch_rows` rows (small part files
    coalesced) of the ledger schema, in `read_ledger` order; one batch is decoded ahead (bounded memory)."""
    files = [str(f) for f in ledger_files(path)]
    if not files:
        return
    scan = ds.dataset(files, schema=SCHEMA, format="parquet").scanner(
        columns=list(columns) if columns else None, batch_size=batch_rows, use_threads=False,
        batch_readahead=1, fragment_readahead=1,
        fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False))
    buf: list[pa.RecordBatch] = []
    n = 0
    for batch in scan.to_batches():  # ordered: fragments in list order, batches in file order
        buf.append(batch)
        n += batch.num_rows
        if n >= batch_rows:  # per-shard parts are small: coalesce them, so per-batch work is amortized
            yield pa.concat_batches(buf)
            buf, n = [], 0
    if n:
        yield pa.concat_batches(buf)


def ledger_rows(path: str | os.PathLike) -> int:
    """Rows of a ledger from the Parquet footers only (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in ledger_files(path))


# ---------------------------------------------------------------------------------------------- id buckets
_MIX = np.uint64(0x9E3779B97F4A7C15)


def id_buckets(ids: pa.Array, n: int) -> np.ndarray:
    """Bucket in [0, n) of each id: a polynomial hash of its UTF-8 bytes, vectorized with numpy (pyarrow has
    no public hash kernel). The same id always lands in the same bucket, whichever batch or step it is in."""
    if n == 1 or len(ids) == 0:
        return np.zeros(len(ids), dtype=np.int64)
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    ids = pc.fill_null(ids, "")
    if ids.type == pa.string():
        ids = ids.cast(pa.large_string())
    _, obuf, dbuf = ids.buffers()
    offs = np.frombuffer(obuf, dtype=np.int64)[ids.offset: ids.offset + len(ids) + 1]
    data = np.frombuffer(dbuf, dtype=np.uint8)[offs[0]: offs[-1]] if dbuf is not None else np.zeros(0, np.uint8)
    starts = offs[:-1] - offs[0]
    lens = np.diff(offs)
    pos = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lens)  # byte position inside its id
    weights = np.cumprod(np.full(int(lens.max(initial=0)) + 1, 0x100000001B3, dtype=np.uint64))  # wraps mod 2^64
    with np.errstate(over="ignore"):
        contrib = (data.astype(np.uint64) + np.uint64(1)) * weights[pos]
        cs = np.concatenate([np.zeros(1, np.uint64), np.cumsum(contrib, dtype=np.uint64)])
        h = cs[np.append(starts, len(data))[1:]] - cs[starts] + lens.astype(np.uint64)
        h ^= h >> np.uint64(31)
        h *= _MIX
        h ^= h >> np.uint64(29)
    return (h % np.uint64(n)).astype(np.int64)


class IdSpill:
    """One set of ids (a step's decided ids, or its passing ids) spilled to `n` Arrow IPC files by bucket."""

    def __init__(self, root: Path, name: str, n: int):
        self.root, self.name, self.n = root, name, n
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self._schema = pa.schema([("id", pa.large_string())])

    def _path(self, b: int) -> Path:
        return self.root / f"{self.name}-{b:05d}.arrow"

    def add(self, ids: pa.Array, buckets: np.ndarray) -> None:
        """Append ids (any string array) to their buckets (`id_buckets(ids, n)`, computed once by the caller)."""
        ids = ids.cast(pa.large_string())
        small = buckets.astype(np.uint16 if self.n <= 1 << 16 else np.int64)  # 16-bit keys: a radix sort
        order = np.argsort(small, kind="stable")
        bounds = np.searchsorted(small[order], np.arange(self.n + 1))
        taken = ids.take(pa.array(order)) if self.n > 1 else ids
        for k in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[k], bounds[k + 1]
            if k not in self._writers:
                self._writers[k] = pa.ipc.new_stream(str(self._path(k)), self._schema)
            self._writers[k].write_batch(pa.record_batch([taken.slice(lo, hi - lo)], schema=self._schema))

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def bucket(self, b: int) -> pa.Array:
        """All ids of bucket `b` (empty array when none)."""
        if not self._path(b).exists():
            return pa.array([], pa.large_string())
        with pa.ipc.open_stream(str(self._path(b))) as r:
            return r.read_all().column("id").combine_chunks()

    def delete(self) -> None:
        self.close()
        for b in range(self.n):
            self._path(b).unlink(missing_ok=True)


@dataclass
class _Problems:
    """Totals and the smallest few ids of one kind of balance problem, gathered bucket by bucket."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, ids: pa.Array) -> None:
        self.count += len(ids)
        if len(ids):
            small = pc.array_sort_indices(ids)[:N_EXAMPLES]
            self.examples = heapq.nsmallest(N_EXAMPLES, self.examples + ids.take(small).to_pylist())


def prove_step(step: str, seen: IdSpill, expected: IdSpill | None) -> None:
    """Raise LedgerError unless every id of `seen` is unique and (when `expected` is given) the two sets are
    equal; the messages are `core.foundation.ledger.check_balance`'s. One bucket of each set in memory at a time."""
    dup, missing, extra = _Problems(), _Problems(), _Problems()
    for b in range(seen.n):
        ids = seen.bucket(b)
        if len(pc.unique(ids)) != len(ids):
            vc = pc.value_counts(ids)
            dup.add(vc.field("values").filter(pc.greater(vc.field("counts"), 1)))
        if expected is not None:
            exp = expected.bucket(b)  # unique: the previous step's passing ids passed this check
            lost = exp.filter(pc.invert(pc.is_in(exp, value_set=ids)))
            missing.add(lost)
            if len(lost) or len(exp) != len(ids):  # else every expected id is among as many unique ids: equal
                extra.add(pc.unique(ids.filter(pc.invert(pc.is_in(ids, value_set=exp)))))
    if dup.count:
        raise LedgerError(f"step {step}: {dup.count} ids decided twice, e.g. {dup.examples}")
    if missing.count or extra.count:
        raise LedgerError(
            f"step {step}: {missing.count} inputs without a decision (e.g. {missing.examples}), "
            f"{extra.count} decisions for unknown ids (e.g. {extra.examples})"
        )


# ------------------------------------------------------------------------------------------- merged writer
def pandas_schema() -> pa.Schema:
    """The ledger schema as pandas writes it (`DataFrame.to_parquet(index=False)` of a ledger frame): the
    string types and the `pandas` metadata of this environment, so pandas readers get the same frame."""
    one = pa.table({n: pa.array([0.0 if t == pa.float64() else "x"], t) for n, t in zip(SCHEMA.names, SCHEMA.types)})
    return pa.Table.from_pandas(one.to_pandas(), preserve_index=False).schema


def as_written(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A ledger batch as the pandas round trip wrote it: NaN scores become nulls, strings take `schema`'s type."""
    score = batch.column("score")
    score = pc.if_else(pc.is_nan(score), pa.scalar(None, pa.float64()), score)
    cols = [score if n == "score" else batch.column(n) for n in SCHEMA.names]
    return pa.record_batch([c.cast(t) for c, t in zip(cols, schema.types)], schema=schema)


class _GroupedWriter:
    """A Parquet file written in row groups of exactly `rows` rows (the last one shorter): batches are buffered
    and written together, so many small ledger parts do not become many tiny row groups."""

    def __init__(self, path: Path, schema: pa.Schema, rows: int, **options):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.schema, self.rows = path, schema, rows
        self._w = pq.ParquetWriter(str(path), schema, **options)
        self._buf: list[pa.RecordBatch] = []
        self._n = 0
        self.written = 0
        self.closed = False

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            take = min(batch.num_rows, self.rows - self._n)
            self._buf.append(batch.slice(0, take))
            self._n += take
            batch = batch.slice(take)
            if self._n == self.rows:
                self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._w.write_table(pa.Table.from_batches(self._buf, schema=self.schema))
            self.written += self._n
        self._buf, self._n = [], 0

    def close(self) -> None:
        self.closed = True
        self._flush()
        if not self.written:  # an empty ledger is one empty row group, as pq.write_table writes it
            self._w.write_table(self.schema.empty_table())
        self._w.close()


class MergedLedgerWriter:
    """Writes the merged ledger: `root/ledger/<step>/part-NNNNN.parquet` (parts of at most `part_rows` rows)
    and, when `single_file`, `root/ledger.parquet` with every step's rows in pipeline order."""

    def __init__(self, root: Path, single_file: bool, row_group_rows: int = ROW_GROUP_ROWS,
                 part_rows: int = PART_MAX_ROWS):
        self.root, self.rg, self.part_rows = root, row_group_rows, part_rows
        self.schema = pandas_schema()
        self._single = _GroupedWriter(root / "ledger.parquet", self.schema, row_group_rows) if single_file else None
        self._part: _GroupedWriter | None = None
        self._step = ""
        self._k = 0

    def start_step(self, step: str) -> None:
        self._close_part()
        self._step, self._k = step, 0
        self._open_part()

    def _open_part(self) -> None:
        self._part = _GroupedWriter(self.root / "ledger" / self._step / f"part-{self._k:05d}.parquet", self.schema,
                                    self.rg, use_dictionary=DICTIONARY_COLUMNS)
        self._k += 1

    def _close_part(self) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None

    def write(self, batch: pa.RecordBatch) -> None:
        batch = as_written(batch, self.schema)
        if self._single is not None:
            self._single.write(batch)
        while batch.num_rows:
            assert self._part is not None, "start_step first"
            room = self.part_rows - self._part.written - self._part._n
            if room == 0:
                self._close_part()
                self._open_part()
                continue
            self._part.write(batch.slice(0, room))
            batch = batch.slice(room)

    def close(self) -> None:
        """Finish every open file (idempotent)."""
        self._close_part()
        if self._single is not None and not self._single.closed:
            self._single.close()


# -------------------------------------------------------------------------------------------- the pass
@dataclass
class StepStats:
    """What one streamed pass over a step's ledger found: the balance, decisions with a reason
    ((step column, decision, reason) -> rows), and the known-bad ids' decisions (decision -> rows)."""

    balance: StepBalance
    reasons: Counter = field(default_factory=Counter)
    known_bad: Counter = field(default_factory=Counter)


@dataclass
class MergedRun:
    """`merge_run_ledgers`' result: per-step stats in pipeline order, the known-bad ids the first step never
    saw, and the merged files (under the staging folder until `publish`)."""

    steps: list[StepStats]
    known_bad_absent: int | None
    staging: Path
    single_file: bool

    @property
    def balance(self) -> list[StepBalance]:
        return [s.balance for s in self.steps]

    def reasons(self) -> list[dict]:
        """Decisions with a reason over all steps, as pandas' groupby wrote them: sorted by (step, decision,
        reason), each {"step", "decision", "reason", "count"}."""
        total: Counter = Counter()
        for s in self.steps:
            total.update(s.reasons)
        return [{"step": k[0], "decision": k[1], "reason": k[2], "count": int(c)} for k, c in sorted(total.items())]

    def publish(self, out_dir: str | os.PathLike) -> None:
        """Move the merged ledger into `out_dir` (replacing an older one there)."""
        out = Path(out_dir)
        if (out / "ledger").exists():
            shutil.rmtree(out / "ledger")
        os.replace(self.staging / "ledger", out / "ledger")
        if self.single_file:
            os.replace(self.staging / "ledger.parquet", out / "ledger.parquet")
        else:
            (out / "ledger.parquet").unlink(missing_ok=True)  # an older run's single file would mislead


def _count(values: pa.Array) -> Counter:
    vc = pc.value_counts(values)
    return Counter(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))


def merge_run_ledgers(step_dirs: str | os.PathLike | Sequence[str | os.PathLike], steps: Sequence[str],
                      staging: str | os.PathLike, known_bad: Iterable[str] | None = None,
                      inputs: Iterable[str] | None = None, single_file_max_rows: int | None = None,
                      bucket_rows: int | None = None, batch_rows: int | None = None) -> MergedRun:
    """One streamed pass per step over the run's ledgers, in pipeline order: prove the balance (as
    `core.foundation.ledger.check_balance`, raising the same LedgerError), count decisions, reasons and known-bad hits,
    and write the merged ledger under `staging` (call `MergedRun.publish(out_dir)` once the caller's own checks
    pass). Memory: a few batches plus two id buckets, whatever the number of samples.

    :param step_dirs: a run directory or the steps' output directories (each holds `ledger/<step>/`).
    :param steps: step names in pipeline order.
    :param staging: an empty local folder for the merged files and the id spill (the spill is removed).
    :param known_bad: ids whose decisions are counted per step (`StepStats.known_bad`).
    :param inputs: the first step's expected ids (as check_balance's `inputs`); default: its own rows.
    :param single_file_max_rows, bucket_rows, batch_rows: default to the module's constants, read per call.
    """
    single_file_max_rows = SINGLE_FILE_MAX_ROWS if single_file_max_rows is None else single_file_max_rows
    bucket_rows, batch_rows = bucket_rows or BUCKET_ROWS, batch_rows or BATCH_ROWS
    staging = Path(staging)
    dirs = [find_step_dir(step_dirs, s) for s in steps]  # LedgerError for a missing step, before any work
    rows = [ledger_rows(d) for d in dirs]
    n_buckets = 1 << max(0, int(np.ceil(np.log2(max(max(rows, default=0), 1) / bucket_rows))))
    spill_dir = Path(tempfile.mkdtemp(dir=staging, prefix=".ids-"))
    bad = pa.array(sorted(set(map(str, known_bad))), pa.string()) if known_bad is not None else None
    bad_seen: set[str] = set()
    writer = MergedLedgerWriter(staging, sum(rows) <= single_file_max_rows)
    expected: IdSpill | None = None
    if inputs is not None:
        expected = IdSpill(spill_dir, "inputs", n_buckets)
        first = pa.array(sorted({str(x) for x in inputs}), pa.large_string())
        expected.add(first, id_buckets(first, n_buckets))
        expected.close()
    out: list[StepStats] = []
    try:
        for i, (step, d) in enumerate(zip(steps, dirs)):
            seen, passing = IdSpill(spill_dir, f"{i}-seen", n_buckets), IdSpill(spill_dir, f"{i}-pass", n_buckets)
            decisions: Counter = Counter()
            st = StepStats(StepBalance(step, 0, 0, 0, 0, 0))
            writer.start_step(step)
            for batch in iter_ledger_batches(d, batch_rows=batch_rows):
                ids, dec, reason = batch.column("sample_id"), batch.column("decision"), batch.column("reason")
                buckets = id_buckets(ids, n_buckets)
                seen.add(ids, buckets)
                passes = pc.fill_null(pc.is_in(dec, value_set=pa.array(PASSING)), False)
                passing.add(ids.filter(passes), buckets[passes.to_numpy(zero_copy_only=False)])
                decisions.update(_count(dec))
                noted = pc.not_equal(reason, "")
                if pc.any(noted).as_py():  # (step, decision, reason) joined by NUL, which no name holds
                    keys = pc.binary_join_element_wise(*(batch.column(c).filter(noted) for c in (
                        "step", "decision", "reason")), "\0")
                    st.reasons.update({tuple(k.split("\0", 2)): c for k, c in _count(keys).items() if k is not None})
                if bad is not None:
                    hit = pc.is_in(ids, value_set=bad)
                    st.known_bad.update(_count(dec.filter(hit)))
                    if i == 0:
                        bad_seen.update(ids.filter(hit).to_pylist())
                writer.write(batch)
            seen.close()
            passing.close()
            prove_step(step, seen, expected)
            seen.delete()
            if expected is not None:
                expected.delete()
            expected = passing
            st.balance = StepBalance(step, sum(decisions.values()), decisions["keep"], decisions["modify"],
                                     decisions["drop"], decisions["quarantine"])
            out.append(st)
    finally:
        writer.close()
        shutil.rmtree(spill_dir, ignore_errors=True)
    absent = len(set(bad.to_pylist()) - bad_seen) if bad is not None and steps else None
    return MergedRun(out, absent, staging, writer._single is not None)
