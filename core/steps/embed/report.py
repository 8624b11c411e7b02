"""Deck / report HTML for an embedding run: raw-norm histograms, a 2-D PCA map coloured by source,
throughput and quarantine tables. Flyte-free (tasks hand the string to `flytekit.Deck`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.steps.embed.store import embedding_files, load_embeddings


def _columns(out_dir: str | Path, names: list[str]) -> dict[str, np.ndarray]:
    import fsspec

    tables = []
    for path in embedding_files(out_dir):
        with fsspec.open(path, "rb") as f:
            t = pq.read_table(f)
        tables.append(t.select([n for n in names if n in t.column_names]))
    if not tables:
        return {}
    t = pa.concat_tables(tables, promote_options="default")
    return {n: t.column(n).to_numpy(zero_copy_only=False) for n in t.column_names}


def pca_2d(x: np.ndarray, max_rows: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components of (a seeded subsample of) the rows; returns (coords, row index)."""
    idx = np.arange(len(x))
    if len(x) > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))
    xs = x[idx].astype(np.float64)
    xs -= xs.mean(0)
    _, _, vt = np.linalg.svd(xs, full_matrices=False)
    return xs @ vt[:2].T, idx


def embed_report_html(out_dir: str | Path, summary: dict[str, Any], shard_stats: list[dict[str, Any]],
                      ledger: Any = None) -> str:
    """Deck HTML: summary/throughput, norms histogram, PCA scatter by source, per-shard stats, reasons."""
    from core.foundation.report import figure_html, new_figure, page, plot_text, table_html

    parts = [table_html([summary], "embedding run (throughput over wall time; model_busy = forward / actor time)")]
    cols = _columns(out_dir, ["sample_id", "source", "image_norm", "text_norm"])
    if cols:
        fig, ax = new_figure()
        for name in ("image_norm", "text_norm"):
            if name in cols:
                v = np.asarray([x for x in cols[name] if x is not None and not np.isnan(x)], float)
                if len(v):
                    ax.hist(v, bins=40, alpha=0.6, label=f"{name.split('_')[0]} (n={len(v)})")
        ax.set_xlabel("raw feature norm before L2 normalisation")
        ax.set_ylabel("samples")
        ax.legend()
        parts.append(figure_html(fig, "embedding norms (outliers = unusual inputs)"))
        kind = "image" if "image_norm" in cols else "text"
        ids, x = load_embeddings(out_dir, kind)
        if len(ids) >= 3:
            src_of = dict(zip(cols["sample_id"], cols["source"]))
            xy, idx = pca_2d(x)
            sources = np.asarray([src_of.get(ids[i], "") or "(none)" for i in idx])
            fig, ax = new_figure(6, 5)
            for s in sorted(set(sources)):
                m = sources == s
                ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, label=f"{plot_text(s)} ({m.sum()})")
            ax.set_xlabel("PC1")
            ax.set_ylabel("PC2")
            ax.legend(fontsize=7, markerscale=2)
            parts.append(figure_html(fig, f"{kind} embeddings, PCA 2-D, coloured by source"))
    if shard_stats:
        keys = ["shard", "n_kept", "n_quarantined", "n_images", "wall_s", "forward_s", "wait_s", "decode_s"]
        parts.append(table_html([{k: s.get(k) for k in keys} for s in shard_stats], "shards embedded in this run"))
    if ledger is not None and len(ledger):
        q = ledger[ledger.decision == "quarantine"].groupby("reason").size().rename("count").reset_index()
        if len(q):
            parts.append(table_html(q, "quarantined by reason"))
    return page(*parts)
