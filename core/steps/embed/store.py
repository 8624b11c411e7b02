"""Embedding file layout (one Parquet file per input shard) and its reader.

`<out_dir>/<shard>.parquet`, one row per kept sample, in shard order:

| column       | type                                   | meaning                                              |
|--------------|----------------------------------------|------------------------------------------------------|
| sample_id    | string                                 | Sample.id                                            |
| source       | string                                 | Sample.source (dataset of origin)                    |
| n_images     | int32                                  | images of the sample (0 = text-only)                 |
| image_emb    | fixed_size_list<float16|float32>[D]    | pooled image vector: mean of the per-image unit      |
|              |   (null when n_images == 0)            | vectors, re-normalised (= the image's own vector     |
|              |                                        | when n_images == 1)                                  |
| image_embs   | list<fixed_size_list<...>[D]>          | one unit vector per image, in `images` order         |
| image_norm   | float32 (null when n_images == 0)      | mean raw (pre-normalisation) norm of the images      |
| text_emb     | fixed_size_list<...>[D]                | unit vector of the configured text view              |
| text_norm    | float32                                | raw norm of the text feature                         |

Image columns exist when `what` is image/both, text columns when text/both. Schema metadata key
`mmcurate.embed` holds JSON {model_name, pretrained, seed, dim, dtype, text_view, what}: the model record.
`load_embeddings` refuses a folder whose files name different models (`MODEL_KEYS`): vectors of two models
live in different spaces, and a matrix mixing them makes every distance meaningless.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"mmcurate.embed"
MODEL_KEYS = ("model_name", "pretrained", "seed", "dim")  # what makes two files' vectors comparable


class MixedModels(ValueError):
    """Embedding files of one folder were made by different models (or seeds)."""


def _fixed(vecs: np.ndarray, dtype: str, dim: int, valid: np.ndarray | None = None) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(vecs, dtype=np.dtype(dtype)).reshape(-1))
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


def build_table(
    rows: Sequence[dict[str, Any]],
    *,
    image_vecs: np.ndarray | None,
    image_norms: np.ndarray | None,
    text_vecs: np.ndarray | None,
    text_norms: np.ndarray | None,
    cfg: Any,
    dim: int,
) -> pa.Table:
    """Assemble one shard's table from per-sample rows (`image_start`, `n_images`, `text_row`) and the
    float32 unit vectors of all images / texts of the shard."""
    n = len(rows)
    dt = cfg.out_dtype
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "n_images": pa.array([r["n_images"] for r in rows], pa.int32()),
    }
    if cfg.embeds_images:
        iv = image_vecs if image_vecs is not None else np.zeros((0, dim), np.float32)
        inorm = image_norms if image_norms is not None else np.zeros((0,), np.float32)
        pooled = np.zeros((n, dim), np.float32)
        pnorm = np.zeros(n, np.float32)
        has = np.zeros(n, bool)
        offsets = [0]
        for i, r in enumerate(rows):
            a, k = r["image_start"], r["n_images"]
            offsets.append(offsets[-1] + k)
            if k == 0:
                continue
            has[i] = True
            block = iv[a : a + k]
            if k == 1:
                pooled[i] = block[0]
            else:
                m = block.mean(axis=0)
                pooled[i] = m / max(float(np.linalg.norm(m)), 1e-12)
            pnorm[i] = float(inorm[a : a + k].mean())
        cols["image_emb"] = _fixed(pooled, dt, dim, has)
        # rows are in shard order, so the kept images are exactly iv in order
        cols["image_embs"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _fixed(iv, dt, dim))
        cols["image_norm"] = pa.array(pnorm, pa.float32(), mask=~has)
    if cfg.embeds_texts:
        tv = text_vecs if text_vecs is not None else np.zeros((0, dim), np.float32)
        tn = text_norms if text_norms is not None else np.zeros((0,), np.float32)
        cols["text_emb"] = _fixed(tv, dt, dim)
        cols["text_norm"] = pa.array(tn, pa.float32())
    meta = {
        "model_name": cfg.model_name,
        "pretrained": cfg.pretrained,
        "seed": cfg.seed,  # random-init and the tiny model's training depend on it
        "dim": dim,
        "dtype": dt,
        "text_view": cfg.text_view,
        "what": cfg.what,
    }
    table = pa.table(cols)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes of a table; deterministic for equal tables (no timestamps in Parquet metadata)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def embedding_files(out_dir: str | Path) -> list[str]:
    """Sorted per-shard embedding files under `out_dir` (local path or fsspec URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(out_dir))
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return files if proto in ("file", "local") else [f"{proto}://{p}" for p in files]


def model_record(meta: dict[str, Any]) -> dict[str, Any]:
    """The model identity of one file's metadata (`MODEL_KEYS`; absent keys are None)."""
    return {k: meta.get(k) for k in MODEL_KEYS}


def check_one_model(files: Sequence[str | Path]) -> dict[str, Any] | None:
    """The model record shared by every embedding file (read from the Parquet footers only), or None for
    no files; raises `MixedModels` naming the files and the differing fields when they disagree."""
    import fsspec

    first: tuple[str, dict[str, Any]] | None = None
    for path in files:
        with fsspec.open(str(path), "rb") as f:
            meta = json.loads((pq.read_schema(f).metadata or {}).get(META_KEY, b"{}"))
        rec = model_record(meta)
        if first is None:
            first = (str(path), rec)
        elif rec != first[1]:
            diff = {k: (first[1][k], rec[k]) for k in MODEL_KEYS if first[1][k] != rec[k]}
            raise MixedModels(f"embedding files of different models: {first[0]} and {path} differ in "
                              + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                              + "; re-embed the folder with one model (embed_shards on_mismatch='recompute')")
    return None if first is None else first[1]


def _to_matrix(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    arr = col.combine_chunks()
    vals = arr.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slices and skips null rows
    return vals.reshape(-1, dim)


def load_embeddings(out_dir: str | Path, kind: str = "image", dtype: str = "float32") -> tuple[list[str], np.ndarray]:
    """All embeddings of one kind from an embedding directory, as (sample ids, (N, D) matrix).

    kind: `image` (pooled vector per sample; text-only samples are left out), `text` (one per sample),
    or `image_each` (one row per image; ids repeat for multi-image samples). Rows are in shard order;
    vectors are unit-norm up to the stored dtype's rounding. Raises `MixedModels` when the files were made
    by different models (`check_one_model`).
    """
    if kind not in ("image", "text", "image_each"):
        raise ValueError(f"kind={kind!r}; expected image, text or image_each")
    import fsspec

    col = {"image": "image_emb", "text": "text_emb", "image_each": "image_embs"}[kind]
    ids: list[str] = []
    mats: list[np.ndarray] = []
    dim = 0
    files = embedding_files(out_dir)
    check_one_model(files)
    for path in files:
        with fsspec.open(path, "rb") as f:
            t = pq.read_table(f, columns=["sample_id", col, "n_images"] if kind != "text" else ["sample_id", col])
        meta = json.loads((t.schema.metadata or {}).get(META_KEY, b"{}"))
        if col not in t.column_names:
            raise ValueError(f"{path} has no {col} column (embedded with what={meta.get('what')!r})")
        dim = int(meta["dim"])
        sid = t.column("sample_id").to_pylist()
        if kind == "image":
            valid = t.column(col).is_valid().to_numpy(zero_copy_only=False)
            t = t.filter(pa.array(valid))
            sid = [s for s, ok in zip(sid, valid) if ok]
            mats.append(_to_matrix(t.column(col), dim))
        elif kind == "image_each":
            lst = t.column(col).combine_chunks()
            counts = np.diff(lst.offsets.to_numpy())
            sid = [s for s, c in zip(sid, counts) for _ in range(int(c))]
            mats.append(lst.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim))
        else:
            mats.append(_to_matrix(t.column(col), dim))
        ids.extend(sid)
    if not mats:
        return [], np.zeros((0, dim), np.dtype(dtype))
    return ids, np.concatenate(mats).astype(dtype, copy=False)
