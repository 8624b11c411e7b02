"""fsspec helpers for benchmark caches: glob, read parquet row by row, read JSON, HF image structs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def _fs(url: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with '/'."""
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def glob(pattern: str) -> list[str]:
    """Sorted matches of `pattern`, returned with the same protocol as the pattern."""
    fs, path = _fs(pattern)
    proto = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return sorted(proto + p if proto and not p.startswith(proto) else p for p in fs.glob(path))


def exists(url: str) -> bool:
    """Whether a file or directory exists."""
    fs, path = _fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    """The whole file."""
    fs, path = _fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url: str) -> Any:
    """A JSON document."""
    return json.loads(read_bytes(url))


def iter_parquet_rows(urls: list[str], batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """Rows of parquet files as dicts, streamed in record batches (HF datasets' parquet exports)."""
    import pyarrow.parquet as pq

    for url in urls:
        fs, path = _fs(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_size):
                yield from batch.to_pylist()


def image_struct_bytes(value: Any) -> bytes:
    """Encoded bytes of an HF `Image` feature value ({"bytes": ..., "path": ...}) or raw bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"])
    raise ValueError("image has no embedded bytes")
