"""Source partitions: a source cut, at its own boundaries, into ordered ranges of about `partition_records`
records that ingest can read independently (core/io/ingest.py `IngestStep`, one fan-out unit each).

Per file, in the source's file order:

    JSON array   item ranges (the counting scan, `split_json_array`, finds every item's byte offset)
    JSONL        byte ranges cut at the start of a line
    Parquet      row-group ranges (a row group is never split)
    WDS tar      the whole tar (a shard is a partition)

A file that fits one partition is read whole, exactly as the one-pass ingest reads it. A `Partition` is
plain data: its unit string (`unit`, sorted JSON) names the file, the container, the record range and its
order in the source, never code. `iter_partition` yields exactly the `SourceRecord`s (same `file`, `index`,
positions, fallback ids, problems) that the one-pass `iter_source` yields for that range; the bounds at the
door apply per record as there. Planning is the counting pass of the one-pass ingest (`count_records`):
parser-independent, so each partition's record count is what its ledger rows must add up to.

The one known difference: in a JSON array with an item the fast parser (ijson) rejects, the one-pass
ingest reads every later item of the file with the byte splitter, which adds a `byte_offset` to their
quarantine rows; a partition after the one holding that item reads with ijson again, so its quarantine
rows carry no `byte_offset` (decisions, reasons and ids are the same).

Also here: sorted id runs and their bounded k-way merge (`write_run`, `merge_runs`), the means of the
reduce that finds ids decided in more than one partition.
"""

from __future__ import annotations

import heapq
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import fsspec

from core.foundation.limits import DEFAULT_LIMITS, InputLimits
from core.io.sources import (
    DEFAULT_CAPTION_PROMPT,
    SourceError,
    SourceRecord,
    Span,
    _DigitWatch,
    count_file,
    detect_container,
    iter_file,
    list_source_files,
    parse_format,
    split_json_array,
)

_CHUNK = 1 << 20
_NOT_BLANK = re.compile(rb"[^ \t\n\r\x0b\x0c]")  # what bytes.strip() keeps: iter_lines' notion of a blank line


@dataclass(frozen=True)
class Partition:
    """One partition: records `first .. first + n - 1` of `file` (container `kind`, `dialect`), bytes or row
    groups `start .. stop` (-1: to the end); `whole`: the file is one partition and is read whole. `order`:
    its place in the source (the reduce's "first in source order"); `clean`: the file's count pass flagged
    nothing (the fast JSON parser may read it, as in the one-pass ingest); `multi`: the source has several
    files (fallback and duplicate ids then name the file's stem, as in the one-pass ingest)."""

    order: int
    file: str
    kind: str
    dialect: str
    first: int
    n: int
    start: int = 0
    stop: int = -1
    whole: bool = True
    clean: bool = False
    multi: bool = False

    @property
    def name(self) -> str:
        """The unit name: `p00003` (ledger part `part-p00003.parquet`, shards `<prefix>-p00003-000000.tar`)."""
        return f"p{self.order:05d}"

    @property
    def unit(self) -> str:
        """The unit string (sorted JSON): what the fan-out ships to a worker."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_unit(cls, unit: str) -> Partition:
        """Parse a unit string, checking every field's type (it is data read back, never evaluated)."""
        d = json.loads(unit)
        types = {f.name: f.type for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != set(types):
            raise ValueError(f"not a partition unit: {unit[:200]!r}")
        for k, v in d.items():
            want = {"int": int, "str": str, "bool": bool}[types[k]]
            if type(v) is not want:
                raise ValueError(f"partition unit field {k!r} is {type(v).__name__}, expected {want.__name__}")
        return cls(**d)

    @property
    def span(self) -> Span | None:
        return None if self.whole else Span(self.first, self.n, self.start, self.stop)


def plan_partitions(source: str, format: str = "auto", limits: InputLimits = DEFAULT_LIMITS,
                    partition_records: int = 1000) -> list[Partition]:
    """The partitions of `source` in source order, about `partition_records` records each (at least one per
    file, so an empty file is accounted too). Scans every file once without the parsers, as the one-pass
    ingest's count pass does (JSON item boundaries and flagged items, JSONL lines, Parquet footers, tar
    headers); raises SourceError where a JSON array's items cannot be delimited, before any work."""
    if partition_records < 1:
        raise ValueError(f"partition_records={partition_records} out of range; valid: [1, inf)")
    container, dialect = parse_format(format)
    files = list_source_files(source)
    multi = len(set(files)) > 1
    out: list[Partition] = []
    for path in files:
        kind = container if container != "auto" else detect_container(path)
        clean = False
        if kind == "json":
            spans, clean = _json_spans(path, limits, partition_records)
        elif kind == "jsonl":
            spans = _jsonl_spans(path, partition_records)
        elif kind == "parquet":
            spans = _parquet_spans(path, partition_records)
        else:  # a WDS tar, or any other whole file
            spans = [Span(0, count_file(path, kind, limits), 0, -1)]
        for sp in spans:
            out.append(Partition(len(out), path, kind, dialect, sp.first, sp.n, sp.start, sp.stop,
                                 whole=len(spans) == 1, clean=clean, multi=multi))
    return out


def _spans(bounds: list[tuple[int, int]], total: int, last_stop: int = -1) -> list[Span]:
    """Spans from the (first record, start) of each partition and the file's record count."""
    if not bounds:
        return [Span(0, total, 0, last_stop)]
    nxt = bounds[1:] + [(total, last_stop)]
    return [Span(a, b - a, s, e) for (a, s), (b, e) in zip(bounds, nxt)]


def _json_spans(path: str, limits: InputLimits, per: int) -> tuple[list[Span], bool]:
    """Item ranges of a JSON array, and whether the file is clean (`count_file`'s flagged set is empty)."""
    bounds: list[tuple[int, int]] = []
    n, bad = 0, False
    with fsspec.open(path, "rb") as f:
        watch = _DigitWatch(f, limits.max_int_digits)
        try:
            for idx, off, _, err in split_json_array(watch, keep_bytes=False, max_depth=limits.max_json_depth,
                                                     max_item_bytes=limits.max_record_bytes):
                if idx % per == 0:
                    bounds.append((idx, off))
                n += 1
                bad = bad or bool(err)
        except SourceError as e:
            raise SourceError(f"{path}: {e}") from None
    return _spans(bounds, n), not bad and not watch.found


def _jsonl_spans(path: str, per: int) -> list[Span]:
    """Byte ranges of a JSONL file, each starting at a non-blank line (`iter_lines`' records)."""
    bounds: list[tuple[int, int]] = []
    n, base, line_start, blank = 0, 0, 0, True
    with fsspec.open(path, "rb") as f:
        while data := f.read(_CHUNK):
            pos = 0
            while True:
                nl = data.find(b"\n", pos)
                end = nl if nl >= 0 else len(data)
                if blank and _NOT_BLANK.search(data, pos, end):
                    blank = False
                if nl < 0:
                    break
                if not blank:
                    if n % per == 0:
                        bounds.append((n, line_start))
                    n += 1
                line_start, blank, pos = base + nl + 1, True, nl + 1
            base += len(data)
    if not blank:  # a last line without a newline
        if n % per == 0:
            bounds.append((n, line_start))
        n += 1
    return _spans(bounds, n)


def _parquet_spans(path: str, per: int) -> list[Span]:
    """Row-group ranges of a Parquet file (start/stop are row-group indices)."""
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    bounds: list[tuple[int, int]] = []
    rows = acc = 0
    for g in range(meta.num_row_groups):
        if not bounds or acc >= per:
            bounds.append((rows, g))
            acc = 0
        k = meta.row_group(g).num_rows
        rows += k
        acc += k
    return _spans(bounds, rows, meta.num_row_groups)


def iter_partition(p: Partition, caption_prompt: str = DEFAULT_CAPTION_PROMPT,
                   limits: InputLimits = DEFAULT_LIMITS) -> Iterator[SourceRecord]:
    """The records of partition `p`, as the one-pass `iter_source` yields them for that range."""
    return iter_file(p.file, p.kind, p.dialect, caption_prompt, limits, clean=p.clean, span=p.span)


# ---- sorted runs of ids and their merge (the reduce over partitions) ------------------------------------
RUN_BATCH = 8192  # rows per batch written to and read from a run: the merge holds about one batch per run
MERGE_FAN_IN = 64  # runs merged at once; more are merged in rounds through intermediate runs

RUN_COLUMNS = ("sample_id", "order", "stage", "index", "offset")


def write_run(path: str | os.PathLike, rows: Iterable[tuple[str, int, int, int, int]]) -> int:
    """Write `(sample_id, order, stage, index, offset)` rows, sorted by (sample_id, order), as a Parquet
    file of `RUN_BATCH`-row groups (atomically). Returns the number of rows. `offset` -1: none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.foundation.outputs import temp_path

    schema = pa.schema([("sample_id", pa.string()), ("order", pa.int64()), ("stage", pa.int8()),
                        ("index", pa.int64()), ("offset", pa.int64())])
    tmp = temp_path(str(path))
    n = 0
    with pq.ParquetWriter(tmp, schema) as w:
        buf: list[tuple] = []
        for row in rows:
            buf.append(row)
            if len(buf) >= RUN_BATCH:
                w.write_table(pa.Table.from_pylist([dict(zip(RUN_COLUMNS, r)) for r in buf], schema))
                n, buf = n + len(buf), []
        if buf or n == 0:
            w.write_table(pa.Table.from_pylist([dict(zip(RUN_COLUMNS, r)) for r in buf], schema))
            n += len(buf)
    os.replace(tmp, path)
    return n


def read_run(path: str | os.PathLike) -> Iterator[tuple[str, int, int, int, int]]:
    """The rows of a run, `RUN_BATCH` at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=RUN_BATCH, columns=list(RUN_COLUMNS)):
        cols = [batch.column(i).to_pylist() for i in range(len(RUN_COLUMNS))]
        yield from zip(*cols)


def merge_runs(paths: Sequence[str | os.PathLike], tmp_dir: str | os.PathLike) -> Iterator[tuple]:
    """All rows of the sorted runs `paths`, in (sample_id, order) order: a k-way `heapq.merge` over batches,
    at most `MERGE_FAN_IN` runs open at once (more are first merged in rounds into runs under `tmp_dir`,
    removed after). Memory: about `MERGE_FAN_IN x RUN_BATCH` rows, whatever the number of ids."""
    paths = [str(p) for p in paths]
    made: list[str] = []
    try:
        level = 0
        while len(paths) > MERGE_FAN_IN:
            nxt = []
            for i in range(0, len(paths), MERGE_FAN_IN):
                out = os.path.join(str(tmp_dir), f"merge-{level}-{i // MERGE_FAN_IN:06d}.run")
                write_run(out, heapq.merge(*(read_run(p) for p in paths[i:i + MERGE_FAN_IN])))
                made.append(out)
                nxt.append(out)
            paths, level = nxt, level + 1
        yield from heapq.merge(*(read_run(p) for p in paths))
    finally:
        for p in made:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
