"""Reading the embed step's Parquet files and preparing vectors for dedup and mining.

Input contract (written by the embed step): one Parquet file per shard with columns `sample_id` (string),
`image_emb` and `text_emb` (list<float16|float32> or fixed_size_list; null where the sample has no such
embedding, e.g. `image_emb` of a text-only sample) and optionally `shard`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.steps.dedup.config import EMBEDDING_KINDS


@dataclass
class EmbeddingSet:
    """Vectors of one embedding kind. `missing` are ids that lack an embedding of that kind."""

    ids: list[str]
    matrix: np.ndarray  # (n, d) float32, not normalized
    shards: list[str]
    missing: list[str] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)


def embedding_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Sorted Parquet files of an embeddings directory (or the single file given, or a list of files).

    Accepts the embed step's whole output directory too: its `embed/` subfolder is used, and files
    under any `ledger/` folder are never taken for embeddings. A list (e.g. one benchmark's files from
    `core.evals.eval_shards.eval_embedding_sets`) is taken as it is, in the given order.
    """
    if isinstance(path, (list, tuple)):
        if not path:
            raise FileNotFoundError("empty list of embedding files")
        return [Path(f) for f in path]
    p = Path(path)
    if p.is_dir() and (p / "embed").is_dir():
        p = p / "embed"
    files = sorted(f for f in p.rglob("*.parquet") if "ledger" not in f.relative_to(p).parts) if p.is_dir() else [p]
    if not files and p.name == "embed" and (p.parent / "ledger" / "embed").is_dir():
        return []  # the embed step ran on nothing (empty source, all quarantined): zero rows, not an error
    if not files:
        raise FileNotFoundError(f"no *.parquet embedding files under {p}")
    return files


def _list_to_numpy(arr: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, float32 matrix of the valid rows) from a list / fixed_size_list column."""
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    kept = arr.filter(pa.array(valid)) if not valid.all() else arr
    if len(kept) == 0:
        return valid, np.zeros((0, 0), np.float32)
    if pa.types.is_fixed_size_list(kept.type):
        d = kept.type.list_size
    else:
        lengths = pc.list_value_length(kept).to_numpy(zero_copy_only=False)
        d = int(lengths[0])
        if (lengths != d).any():
            raise ValueError(f"column {name}: embeddings of unequal length {sorted(set(lengths.tolist()))[:5]}")
    values = kept.flatten().to_numpy(zero_copy_only=False)  # float16/float32; null values become NaN
    return valid, np.asarray(values, dtype=np.float32).reshape(len(kept), d)


def _kind_columns(kind: str) -> list[str]:
    if kind not in EMBEDDING_KINDS:
        raise ValueError(f"kind={kind!r} not in {EMBEDDING_KINDS}")
    return {"image": ["image_emb"], "text": ["text_emb"]}.get(kind, ["image_emb", "text_emb"])


def _combine(parts: list[np.ndarray], kind: str) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    a, b = parts
    na, nb = np.linalg.norm(a, axis=1, keepdims=True), np.linalg.norm(b, axis=1, keepdims=True)
    # A zero-norm half makes the whole row zero (and a NaN half the whole row NaN) so that the
    # caller's validation reports the sample by id instead of deduplicating on half a vector.
    zero = ((na < 1e-12) | (nb < 1e-12))[:, 0]
    a = a / np.maximum(na, 1e-30)
    b = b / np.maximum(nb, 1e-30)
    if kind == "joint_concat":
        out = np.concatenate([a, b], axis=1).astype(np.float32)
    elif a.shape[1] != b.shape[1]:
        raise ValueError(f"joint_mean needs equal image/text dims, got {a.shape[1]} and {b.shape[1]}")
    else:
        out = ((a + b) * 0.5).astype(np.float32)
    out[zero & np.isfinite(out).all(axis=1)] = 0.0
    return out


def read_embeddings(
    path: str | os.PathLike | Sequence[str | os.PathLike], kind: str, include_ids: set[str] | None = None
) -> EmbeddingSet:
    """Read all embedding Parquet files under `path` for one `kind`, in file then row order.

    Rows without the needed embedding(s) go to `missing` (never silently dropped). `include_ids`
    restricts the result to those ids (the previous step's passing ids).
    """
    cols = _kind_columns(kind)
    ids: list[str] = []
    shards: list[str] = []
    missing: list[str] = []
    missing_shards: list[str] = []
    include = (include_ids if include_ids is None or isinstance(include_ids, (set, frozenset))
               else set(include_ids))
    files = embedding_files(path)
    from core.steps.embed.store import check_one_model  # lazily: core.steps.embed's package imports its pipeline

    check_one_model(files)  # a matrix of two models' vectors makes every distance meaningless
    # filled in place: an np.empty upper bound whose untouched tail never becomes resident, so the
    # reader's peak is ~1x the matrix plus one file, not 2x from concatenating per-file blocks
    total_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    matrix: np.ndarray | None = None
    filled = 0
    for f in files:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        need = {"sample_id", *cols} - names
        if need:
            raise ValueError(f"{f}: missing columns {sorted(need)}")
        table = pf.read(columns=["sample_id", *cols] + (["shard"] if "shard" in names else []))
        sid = np.asarray(table.column("sample_id").to_pylist(), dtype=object).astype(str)
        shard = (
            np.asarray(table.column("shard").to_pylist(), dtype=object).astype(str)
            if "shard" in names
            else np.full(len(sid), f.stem, dtype=object)
        )
        # a hash lookup per row: the include set is every passing id of the run (12M at scale), so nothing
        # per file may walk or sort it (np.isin(sid, list(include)) did: ~0.1 s per file at 100k ids)
        sel = (np.ones(len(sid), bool) if include is None
               else np.fromiter((s in include for s in sid.tolist()), bool, len(sid)))
        valid = sel.copy()
        mats = []
        for c in cols:
            v, m = _list_to_numpy(table.column(c).combine_chunks(), c)
            full = np.full((len(sid), m.shape[1]), np.nan, np.float32)
            full[v] = m
            mats.append(full)
            valid &= v
        missing.extend(sid[sel & ~valid].tolist())
        missing_shards.extend(shard[sel & ~valid].tolist())
        ids.extend(sid[valid].tolist())
        shards.extend(shard[valid].tolist())
        if valid.any():
            block = _combine([m[valid] for m in mats], kind)
            if matrix is None:
                matrix = np.empty((total_rows, block.shape[1]), np.float32)
            elif block.shape[1] != matrix.shape[1]:
                raise ValueError(f"{f}: embedding dim {block.shape[1]}, earlier files have {matrix.shape[1]}")
            matrix[filled : filled + len(block)] = block
            filled += len(block)
        del table, mats
    matrix = matrix[:filled] if matrix is not None else np.zeros((0, 0), np.float32)
    dup = _duplicates(ids)
    if dup:
        raise ValueError(f"duplicate sample ids in embeddings: {dup[:10]}")
    return EmbeddingSet(ids, matrix, shards, missing, missing_shards)


def _duplicates(ids: list[str]) -> list[str]:
    u, c = np.unique(np.asarray(ids, dtype=object).astype(str), return_counts=True) if ids else ([], [])
    return [str(x) for x in np.asarray(u)[np.asarray(c) > 1]] if len(ids) else []


def load_embeddings(path: str | os.PathLike, kind: str) -> tuple[list[str], np.ndarray]:
    """(sample ids, float32 matrix) of one embedding kind; raises if any row lacks that embedding."""
    es = read_embeddings(path, kind)
    if es.missing:
        raise ValueError(f"{len(es.missing)} samples have no {kind} embedding, e.g. {es.missing[:10]}")
    return es.ids, es.matrix


def _row_stats(matrix: np.ndarray, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(all-finite flag, float64 L2 norm) per row, blockwise so no matrix-sized temporary is made."""
    n = matrix.shape[0]
    finite = np.empty(n, bool)
    norms = np.empty(n, np.float64)
    for s in range(0, n, block):
        b = matrix[s : s + block]
        finite[s : s + block] = np.isfinite(b).all(axis=1)
        norms[s : s + block] = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))
    return finite, norms


def invalid_rows(ids: list[str], matrix: np.ndarray) -> dict[str, str]:
    """{sample_id: why} for rows that are not finite or have (near-)zero norm."""
    if matrix.size == 0:
        return {}
    finite, norms = _row_stats(matrix)
    bad: dict[str, str] = {}
    for i in np.flatnonzero(~finite):
        bad[ids[i]] = "nan_or_inf_embedding"
    for i in np.flatnonzero(finite & (norms < 1e-12)):
        bad[ids[i]] = "zero_norm_embedding"
    return bad


def normalize_rows(ids: list[str], matrix: np.ndarray, inplace: bool = False) -> np.ndarray:
    """L2-normalize rows (float32). Raises ValueError naming the sample ids of NaN/inf/zero-norm rows.

    inplace=True reuses a float32 input's memory (no matrix-sized temporaries).
    """
    if matrix.size == 0:
        return matrix.astype(np.float32, copy=not inplace)
    finite, norms = _row_stats(matrix)
    if not finite.all() or (norms < 1e-12).any():
        bad = invalid_rows(ids, matrix)
        items = sorted(bad.items())
        raise ValueError(
            f"{len(bad)} invalid embeddings (NaN/inf or zero norm): "
            + ", ".join(f"{k} ({v})" for k, v in items[:20])
            + (" ..." if len(items) > 20 else "")
        )
    x = matrix if inplace and matrix.dtype == np.float32 else matrix.astype(np.float32, copy=True)
    x /= norms.astype(np.float32)[:, None]
    return x
