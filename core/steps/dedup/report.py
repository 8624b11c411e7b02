"""Deck / standalone HTML report of a SemDeDup run, from summary.json (and samples for the gallery)."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from core.foundation.report import figure_html, image_html, new_figure, page, table_html, text_html


def _sample_text(s: Any, max_chars: int = 400) -> str:
    turns = getattr(s, "conversations", None) or []
    txt = "\n".join(f"{t.role}: {t.value}" for t in turns)
    return txt[:max_chars] + ("..." if len(txt) > max_chars else "")


def _sample_cell(sid: str, s: Any) -> str:
    if s is None:
        return f"<div><b>{html.escape(sid)}</b><br/><i>sample not found in shards</i></div>"
    imgs = "".join(image_html(b, 140) for b in (getattr(s, "image_bytes", None) or [])[:2])
    return f"<div><b>{html.escape(sid)}</b><br/>{imgs}{text_html(_sample_text(s))}</div>"


def gallery_html(pairs: Sequence[dict], fetch: Callable[[list[str]], dict[str, Any]] | None, title: str) -> str:
    """Removed sample next to the earlier cluster member that made it a duplicate (images + text)."""
    ids = sorted({p["sample_id"] for p in pairs} | {p["neighbour_id"] for p in pairs})
    samples = fetch(ids) if (fetch and ids) else {}
    rows = []
    for p in pairs:
        rows.append(
            "<tr><td>"
            + f"M={p['m']:.5f}<br/>cluster {p['cluster']}</td><td>removed:"
            + _sample_cell(p["sample_id"], samples.get(p["sample_id"]))
            + "</td><td>kept neighbour:"
            + _sample_cell(p["neighbour_id"], samples.get(p["neighbour_id"]))
            + "</td></tr>"
        )
    body = "".join(rows) or "<tr><td><i>no removed pairs</i></td></tr>"
    return f"<h3>{html.escape(title)}</h3><table border='1' style='border-collapse:collapse'>{body}</table>"


def semdedup_report_html(summary: dict, fetch: Callable[[list[str]], dict[str, Any]] | None = None) -> str:
    """Curves and tables a researcher checks before trusting a dedup run.

    fetch(ids) -> {id: Sample with image_bytes} renders the pair gallery with images and text.
    """
    s = summary
    head = table_html(
        [
            {
                "mode": s["mode"],
                "input": s["n_input"],
                "deduplicated": s["n_deduped"],
                "removed": s["n_removed"],
                "removed %": 100 * s["removed_fraction"],
                "target %": None if s["target_removal"] is None else 100 * s["target_removal"],
                "asked": s.get("n_asked"),
                "floor (min_similarity)": s.get("min_similarity"),
                "eps": s["eps"],
                "eps reproduces": s["eps_exact"],
                "clusters": s["n_clusters"],
                "quarantined": s["n_quarantined"],
                "skipped (no embedding)": s["n_skipped"],
                "kind": s["kind"],
                "keep": s["keep"],
            }
        ],
        "SemDeDup summary",
    )
    notes = text_html("\n".join(s["notes"]), "notes") if s["notes"] else ""

    fig, ax = new_figure()
    ax.plot(s["curve"]["eps"], np.asarray(s["curve"]["removed_fraction"]) * 100, marker=".")
    ax.axvline(s["eps"], color="r", ls="--", label=f"chosen eps={s['eps']:.4f}")
    ax.set_xlabel("eps (remove when M > 1 - eps)")
    ax.set_ylabel("removed %")
    ax.legend()
    curve = figure_html(fig, "Removal vs eps (from M, no recomputation)")

    sizes = np.asarray(s["cluster_sizes"])
    fig, ax = new_figure()
    ax.hist(sizes[sizes > 0], bins=min(50, max(5, len(sizes) // 4 or 1)))
    ax.set_xlabel("cluster size")
    ax.set_ylabel("clusters")
    if (sizes > 0).any():  # an empty run has no clusters: a log axis would have nothing to scale
        ax.set_yscale("log")
    hist = figure_html(fig, f"Cluster sizes ({int((sizes == 0).sum())} empty)")

    removed = np.asarray(s["cluster_removed"])
    fig, ax = new_figure()
    nz = sizes > 0
    ax.scatter(sizes[nz], removed[nz] / sizes[nz] * 100, s=6)
    ax.set_xlabel("cluster size")
    ax.set_ylabel("removed % in cluster")
    per_cluster = figure_html(fig, "Per-cluster removal")
    top = np.argsort(-removed, kind="stable")[:15]
    top_tbl = table_html(
        [{"cluster": int(c), "size": int(sizes[c]), "removed": int(removed[c]),
          "removed %": 100 * removed[c] / max(sizes[c], 1)} for c in top if removed[c] > 0],
        "Clusters with the most removals",
    )

    sweep = ""
    if s["sweep"]:
        fig, ax = new_figure()
        ax.plot([r["k"] for r in s["sweep"]], [100 * r["removed_fraction"] for r in s["sweep"]], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("number of clusters (subsample)")
        ax.set_ylabel(f"removed % at eps={s['eps']:.4f}")
        sweep = figure_html(fig, "Removal vs number of clusters (subsample, same eps)")

    return page(
        head, notes, curve, hist, per_cluster, top_tbl, sweep,
        gallery_html(s["most_similar_pairs"], fetch, "Most similar removed pairs"),
        gallery_html(s["least_similar_pairs"], fetch, "Least similar removed pairs (closest to the threshold)"),
    )


def shard_fetcher(shards_root: str, shard_of: dict[str, str]) -> Callable[[list[str]], dict[str, Any]]:
    """fetch(ids) -> {id: Sample with image bytes}, opening only the shards that hold those ids.

    shards_root: directory or URL holding `<shard>.tar` (e.g. `<run>/shards`); shard_of: id -> shard name
    (the ledger's `shard` column).
    """

    def fetch(ids: list[str]) -> dict[str, Any]:
        from core.io.wds import iter_shard, list_shards, shard_name

        by_name = {shard_name(u): u for u in list_shards(shards_root)}
        want: dict[str, set[str]] = {}
        for i in ids:
            if shard_of.get(i) in by_name:
                want.setdefault(shard_of[i], set()).add(i)
        out: dict[str, Any] = {}
        for name, sids in sorted(want.items()):
            for smp in iter_shard(by_name[name], include_ids=sids, verify_images=False):
                out[smp.id] = smp
        return out

    return fetch


def _decontam_gallery(led: Any, fetch_train: Callable | None, fetch_eval: Callable | None, cfg: Any,
                      n: int = 12) -> str:
    """Dropped samples with the highest similarity and the kept ones closest to the threshold (what was
    just missed), each next to its nearest eval item (images + text)."""
    import json

    rows = led.dropna(subset=["score"]).copy()
    rows["eval_id"] = [json.loads(x or "{}").get("eval_id", "") for x in rows["extra"]]
    dropped = rows[rows["decision"] == "drop"].sort_values(["score", "sample_id"], ascending=[False, True]).head(n)
    kept = rows[rows["decision"] == "keep"].sort_values(["score", "sample_id"], ascending=[False, True]).head(n)
    train = fetch_train(sorted(set(dropped.sample_id) | set(kept.sample_id))) if fetch_train else {}
    evals = fetch_eval(sorted(set(dropped.eval_id) | set(kept.eval_id))) if fetch_eval else {}
    parts = []
    for title, df in ((f"dropped: most similar to an eval item (threshold {cfg.threshold})", dropped),
                      ("kept: most similar to an eval item (closest to the threshold)", kept)):
        body = "".join(
            f"<tr><td>sim={r.score:.5f}<br/>{html.escape(str(r.reason or r.decision))}</td><td>training:"
            + _sample_cell(r.sample_id, train.get(r.sample_id)) + "</td><td>nearest eval item:"
            + _sample_cell(r.eval_id, evals.get(r.eval_id)) + "</td></tr>"
            for r in df.itertuples()
        ) or "<tr><td><i>none</i></td></tr>"
        parts.append(f"<h3>{html.escape(title)}</h3><table border='1' style='border-collapse:collapse'>{body}</table>")
    return "".join(parts)


def decontam_report_html(out_dir: str, counts: dict, cfg: Any, fetch_train: Callable | None = None,
                         fetch_eval: Callable | None = None) -> str:
    """Decontamination deck: counts per benchmark, similarity histogram, a gallery of dropped and borderline
    kept samples next to their nearest eval item, top mined pairs per benchmark.

    fetch_train / fetch_eval(ids) -> {id: Sample with image_bytes} (see `shard_fetcher`) fill the gallery's
    images and text; without them the gallery shows ids only."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from core.foundation.ledger import read_ledger, step_dir

    led = read_ledger(step_dir(out_dir, "decontam"))
    scores = led["score"].dropna().to_numpy()
    fig, ax = new_figure()
    if len(scores):
        ax.hist(scores, bins=60)
    ax.axvline(cfg.threshold, color="r", ls="--", label=f"threshold {cfg.threshold}")
    ax.set_yscale("log")
    ax.set_xlabel("max cosine similarity to any eval item")
    ax.set_ylabel("training samples")
    ax.legend()
    parts = [
        table_html([{"input": counts["n_input"], "dropped": counts["n_dropped"], "quarantined": counts["n_quarantined"],
                     **{f"dropped:{b}": n for b, n in counts["by_benchmark"].items()}}], "decontamination"),
        figure_html(fig, "Similarity of training samples to the nearest eval item"),
        _decontam_gallery(led, fetch_train, fetch_eval, cfg),
    ]
    for f in sorted((Path(out_dir) / "mining").glob("*.parquet")):
        t = pq.read_table(f).to_pandas()
        parts.append(table_html(t.sort_values("similarity", ascending=False).head(20), f"most similar mined: {f.stem}"))
    return page(*parts)
