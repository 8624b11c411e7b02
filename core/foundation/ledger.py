"""Sample ledger: one Parquet table per step, keyed by sample id, saying what happened to each sample.

Columns: sample_id, step, decision (keep/drop/quarantine/modify), reason, score, shard, extra (JSON).
A run directory holds `ledger/<step>/part-*.parquet`; `check_balance` proves that every sample that
entered a step left it exactly once (inputs = kept + modified + dropped + quarantined).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.foundation.outputs import temp_path

DECISIONS = ("keep", "drop", "quarantine", "modify")
PASSING = ("keep", "modify")  # decisions whose samples flow on to the next step

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("step", pa.string()),
        ("decision", pa.string()),
        ("reason", pa.string()),
        ("score", pa.float64()),
        ("shard", pa.string()),
        ("extra", pa.string()),
    ]
)


class LedgerError(AssertionError):
    """The ledgers of a run do not account for every sample exactly once."""


class LedgerWriter:
    """Streaming writer of one step's ledger part. Use as a context manager; rows are flushed in groups.

    >>> with LedgerWriter(path, step="semdedup") as led:
    ...     led.add("s1", "drop", "semdedup_eps", score=0.97, cluster=3)
    """

    def __init__(self, path: str | os.PathLike, step: str, flush_every: int = 50_000):
        self.path = Path(path)
        self.step = step
        self.flush_every = flush_every
        self._rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._writer: pq.ParquetWriter | None = None
        self._tmp = ""  # unique temp file beside the part (core.foundation.step.temp_path), renamed over it on close
        self.counts: dict[str, int] = {d: 0 for d in DECISIONS}
        self.reasons: dict[str, int] = {}
        self.decided: set[str] = set()  # one decision per sample and step: enforced here

    def add(
        self,
        sample_id: str,
        decision: str,
        reason: str = "",
        score: float | None = None,
        shard: str = "",
        **extra: Any,
    ) -> None:
        """Record one decision. `extra` keyword values are stored as a JSON object."""
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r} not in {DECISIONS}")
        if decision in ("drop", "quarantine") and not reason:
            raise ValueError(f"a {decision} needs a reason (sample {sample_id})")
        sample_id = str(sample_id)
        if sample_id in self.decided:
            raise ValueError(f"sample {sample_id} already decided in step {self.step}")
        self.decided.add(sample_id)
        if score is not None:
            score = float(score)
        r = self._rows
        r["sample_id"].append(sample_id)
        r["step"].append(self.step)
        r["decision"].append(decision)
        r["reason"].append(reason)
        r["score"].append(score)
        r["shard"].append(shard)
        r["extra"].append(json.dumps(extra, sort_keys=True, default=_jsonable) if extra else "")
        self.counts[decision] += 1
        if reason:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(r["sample_id"]) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._rows["sample_id"] and self._writer is not None:
            return
        table = pa.Table.from_pydict(self._rows, schema=SCHEMA)
        if self._writer is None:
            self._tmp = temp_path(self.path)  # unique: two writers of one part never share a temp file
            self._writer = pq.ParquetWriter(self._tmp, SCHEMA)
        self._writer.write_table(table)
        self._rows = {name: [] for name in SCHEMA.names}

    def close(self) -> Path:
        """Flush and atomically publish the part (a crash leaves no half-written ledger)."""
        self.flush()
        assert self._writer is not None
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()
            Path(self._tmp).unlink(missing_ok=True)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


def step_dir(run_dir: str | os.PathLike, step: str) -> Path:
    """Directory holding the ledger parts of `step` inside a run directory."""
    return Path(run_dir) / "ledger" / step


def ledger_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a ledger file, step directory or `ledger/` tree, in the order every reader uses."""
    p = Path(path)
    return sorted(p.rglob("*.parquet")) if p.is_dir() else [p]


def _ledger_columns(columns: Sequence[str] | None) -> list[str]:
    names = list(SCHEMA.names) if columns is None else list(columns)
    unknown = sorted(set(names) - set(SCHEMA.names))
    if unknown:
        raise ValueError(f"unknown ledger columns {unknown}; the ledger has {SCHEMA.names}")
    return names


def ledger_table(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """One ledger file, a step directory or a run's whole `ledger/` tree as one Arrow table (parts in path order),
    `columns` only (None: all): what a reduce reads when it needs ids and decisions (no pandas, no `detail` and
    `extra` strings, which are most of a ledger's bytes)."""
    return _read_parts(ledger_files(path), _ledger_columns(columns))


def _read_parts(files: list[Path], names: list[str]) -> pa.Table:
    schema = pa.schema([SCHEMA.field(n) for n in names])
    if not files:
        return schema.empty_table()
    return pa.concat_tables([_read_part(f, names, schema) for f in files])


def _read_part(f: Path, names: list[str], schema: pa.Schema) -> pa.Table:
    """One part's `names` columns in the ledger's types. `ParquetFile.read` where the part has them as they
    should be (it imports no pandas, which `pq.read_table` does: ~0.2 s for a reduce that never needs it), the
    dataset reader (fills absent columns with nulls, casts) otherwise."""
    pf = pq.ParquetFile(f)
    have = pf.schema_arrow
    if all(have.get_field_index(n) >= 0 and have.field(n).type == schema.field(n).type for n in names):
        return pf.read(columns=names).select(names)
    return pq.read_table(f, schema=SCHEMA, columns=names)


def read_ledger(path: str | os.PathLike, columns: Sequence[str] | None = None) -> "pd.DataFrame":  # noqa: F821
    """Read one ledger file, a step directory, or a run's whole `ledger/` tree into a DataFrame (`columns`:
    only those, see `ledger_table`)."""
    import pandas as pd

    names, files = _ledger_columns(columns), ledger_files(path)
    if not files:  # no part at all: typed empty columns
        return pd.DataFrame({n: pd.Series(dtype=_pd_dtype(SCHEMA.field(n).type)) for n in names})
    return _read_parts(files, names).to_pandas()


def _pd_dtype(t: pa.DataType) -> str:
    return "float64" if t == pa.float64() else "object"


def passing_ids(ledger: "pd.DataFrame") -> list[str]:  # noqa: F821
    """Sample ids a step let through (kept or modified), in ledger order."""
    return ledger.loc[ledger["decision"].isin(PASSING), "sample_id"].tolist()


@dataclass
class StepBalance:
    step: str
    inputs: int
    kept: int
    modified: int
    dropped: int
    quarantined: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_step_dir(run_dirs: str | os.PathLike | Sequence[str | os.PathLike], step: str) -> Path:
    """The `ledger/<step>` directory of a step, searched in one run dir or in several step output dirs."""
    dirs = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
    for d in dirs:
        if step_dir(d, step).is_dir():
            return step_dir(d, step)
    raise LedgerError(f"no ledger for step {step!r} in {[str(d) for d in dirs]}")


def check_balance(
    run_dir: str | os.PathLike | Sequence[str | os.PathLike],
    steps: Sequence[str],
    inputs: Iterable[str] | None = None,
) -> list[StepBalance]:
    """Prove every sample is accounted for exactly once per step, in pipeline order.

    `run_dir` is a run directory or a list of step output directories holding `ledger/<step>/`.
    Step k's inputs are step k-1's kept+modified ids (step 0's are `inputs` when given, else its own
    rows). Raises `LedgerError` naming missing, unexpected and duplicated ids.
    """
    out: list[StepBalance] = []
    expected: set[str] | None = set(inputs) if inputs is not None else None
    for step in steps:
        df = read_ledger(find_step_dir(run_dir, step))
        ids = df["sample_id"]
        dup = ids[ids.duplicated()].unique().tolist()
        if dup:
            raise LedgerError(f"step {step}: {len(dup)} ids decided twice, e.g. {dup[:5]}")
        seen = set(ids)
        if expected is not None and seen != expected:
            missing = sorted(expected - seen)[:5]
            extra = sorted(seen - expected)[:5]
            raise LedgerError(
                f"step {step}: {len(expected - seen)} inputs without a decision (e.g. {missing}), "
                f"{len(seen - expected)} decisions for unknown ids (e.g. {extra})"
            )
        c = df["decision"].value_counts()
        out.append(
            StepBalance(
                step,
                len(df),
                int(c.get("keep", 0)),
                int(c.get("modify", 0)),
                int(c.get("drop", 0)),
                int(c.get("quarantine", 0)),
            )
        )
        expected = set(passing_ids(df))
    return out
