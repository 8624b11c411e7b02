"""The one id-list loader: every task that takes a list of sample ids (trusted reference ids, a subset to
export, known-bad ids for the run summary) reads it with `load_id_list`.

Accepted, whatever the file's name:
- Parquet (`*.parquet`): its `sample_id` column;
- JSON: a list of ids, or an object holding the list under `key` (`ids` when the object has no `key`);
  the demo's ground_truth.json holds `clean` (trusted) and `bad` (known-bad) lists: pass `key="clean"` / `"bad"`;
- text: one id per line; blank lines and lines starting with `#` are skipped.

Ids are strings (a JSON integer becomes its decimal string); anything else (null, a nested list, an empty id)
is refused with the file and the position, never silently dropped.
"""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_KEY = "ids"


def load_id_list(path: str | os.PathLike, key: str = DEFAULT_KEY) -> list[str]:
    """Sample ids from a Parquet `sample_id` column, a JSON list, a JSON object's `key` (else `ids`) list, or
    one id per line (local path or fsspec URL). Raises ValueError naming the file on anything else."""
    import fsspec

    p = os.fspath(path)
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(p, "rb") as f:
            table = pq.read_table(f)
        if "sample_id" not in table.column_names:
            raise ValueError(f"{p}: a Parquet id list needs a `sample_id` column; columns: {table.column_names}")
        return _checked(p, table.column("sample_id").to_pylist())
    with fsspec.open(p, "r", encoding="utf-8") as f:
        text = f.read()
    head = text.lstrip()[:1]
    if head in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e}); expected a list of ids or an object with a "
                             f"{key!r} list") from None
        if isinstance(data, dict):
            k = key if key in data else DEFAULT_KEY
            if k not in data:
                raise ValueError(f"{p}: the JSON object has no {key!r} (or {DEFAULT_KEY!r}) list; keys: "
                                 f"{sorted(data)[:20]}")
            data = data[k]
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a list of ids, got {type(data).__name__}")
        return _checked(p, data)
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def _checked(path: str, ids: list[Any]) -> list[str]:
    out = []
    for i, x in enumerate(ids):
        if isinstance(x, bool) or not isinstance(x, (str, int)) or (isinstance(x, str) and not x.strip()):
            raise ValueError(f"{path}: id #{i} is {x!r}; ids are non-empty strings (or integers)")
        out.append(str(x))
    return out
