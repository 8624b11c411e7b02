"""Random-but-clustered embeddings with planted duplicates (tests, benchmarks, demos)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def clustered_embeddings(
    n: int, d: int, n_centers: int, seed: int = 0, spread: float = 0.7, big_cluster: int = 0
) -> np.ndarray:
    """(n, d) float32 rows around `n_centers` Gaussian centers; cos between two members ~ 1/(1+spread^2).

    big_cluster > 0 puts that many rows around one extra center (a skewed cluster).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers + 1, d), dtype=np.float32)
    lab = rng.integers(0, n_centers, n)
    if big_cluster:
        lab[:big_cluster] = n_centers
    x = np.empty((n, d), np.float32)
    block = 65_536
    for s in range(0, n, block):  # blockwise to keep the generator's own peak memory ~1x
        e = min(n, s + block)
        x[s:e] = centers[lab[s:e]] + spread * rng.standard_normal((e - s, d), dtype=np.float32)
    return x


def plant_duplicates(
    x: np.ndarray, n_exact: int, n_noisy: int, noise: float = 0.02, seed: int = 1
) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Append exact copies and noisy copies (Gaussian noise of relative size `noise`) of random rows.

    Returns (matrix, ids, {copy id: source id}). Ids: `s<row>` originals, `dupE<i>` / `dupN<i>` copies.
    """
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    src = rng.choice(n, size=n_exact + n_noisy, replace=False)
    ex = x[src[:n_exact]]
    base = x[src[n_exact:]]
    scale = np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(x.shape[1])
    nz = base + noise * scale * rng.standard_normal(base.shape, dtype=np.float32)
    ids = [f"s{i:07d}" for i in range(n)] + [f"dupE{i:06d}" for i in range(n_exact)] + [
        f"dupN{i:06d}" for i in range(n_noisy)
    ]
    planted = {ids[n + i]: ids[int(j)] for i, j in enumerate(src)}
    return np.concatenate([x, ex, nz]).astype(np.float32), ids, planted


def write_embedding_parquet(
    path: str, ids: list[str], image: np.ndarray | None, text: np.ndarray | None, fixed: bool = False,
    dtype: str = "float32", null_image: set[str] | None = None,
) -> None:
    """One embeddings file in the embed step's format (list<float> columns, optional nulls)."""
    pa_t = pa.float16() if dtype == "float16" else pa.float32()

    def col(m: np.ndarray | None, nulls: set[str]) -> pa.Array:
        if m is None:
            return pa.nulls(len(ids), pa.list_(pa_t))
        vals = pa.array(m.astype(dtype).ravel(), pa_t)
        d = m.shape[1]
        mask = pa.array([i in nulls for i in ids])
        if fixed:
            arr = pa.FixedSizeListArray.from_arrays(vals, d, mask=mask)
        else:
            arr = pa.ListArray.from_arrays(pa.array(np.arange(0, len(ids) * d + 1, d, dtype=np.int32)), vals, mask=mask)
        return arr

    table = pa.table(
        {"sample_id": pa.array(ids, pa.string()), "image_emb": col(image, null_image or set()),
         "text_emb": col(text, set())}
    )
    pq.write_table(table, path)
