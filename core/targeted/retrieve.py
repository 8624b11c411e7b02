"""Retrieval: for each subgroup, the pool images nearest to its reference images in the existing
embedding space (the embed step's vectors), with a per-subgroup budget and no image used twice.

Candidates come from the mining code (`core.steps.dedup.mining.NeighbourMiner`, faiss inner product on
normalized vectors, pool streamed one embeddings file at a time): `budget * oversample` neighbours per
reference image (`nearest`) or per subgroup centroid (`centroid`). A candidate's score for a subgroup is
its best similarity to the subgroup's queries. Assignment is greedy over all (subgroup, image) pairs by
descending similarity (ties: subgroup, then id): an image goes to the subgroup it is closest to among
those with budget left, so no image is used twice and no subgroup exceeds its budget.

Only pool ids that passed `allowed_ids` (the pool's decontamination ledger: near-copies of eval test
items are never retrieved) are searched. Ledger `tg_retrieve`: one row per candidate image, `keep` when
retrieved (extra: subgroup, similarity, nearest reference, generated id), `drop` with
`retrieval_over_budget` otherwise.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from core.foundation.ledger import LedgerWriter, step_dir
from core.foundation.sample import sample_key
from core.foundation.step import write_atomic
from core.steps.dedup.embeddings import embedding_files, invalid_rows, normalize_rows, read_embeddings
from core.steps.dedup.mining import NeighbourMiner
from core.targeted.config import TargetedConfig

log = logging.getLogger(__name__)
STEP = "tg_retrieve"
RETRIEVED_COLUMNS = ["gen_id", "pool_id", "pool_shard", "subgroup", "family", "similarity", "ref_id", "rank",
                     "gen_shard"]


def generated_id(pool_id: str) -> str:
    """Id of the sample generated for a pool image (one per image: images are never reused)."""
    return f"tg-{sample_key(pool_id)}"


def subgroup_queries(ref: pd.DataFrame, ref_emb: str | os.PathLike, cfg: TargetedConfig) -> dict[str, tuple[list[str], np.ndarray]]:
    """{subgroup: (query names, normalized query vectors)}: reference images, or their centroid."""
    used = ref[ref["used"]]
    es = read_embeddings(ref_emb, cfg.embed_kind, set(used["ref_id"]))
    if es.missing:
        log.warning("%d reference samples have no %s embedding and are not queries, e.g. %s", len(es.missing),
                    cfg.embed_kind, es.missing[:5])
    bad = invalid_rows(es.ids, es.matrix)
    keep = [i for i, sid in enumerate(es.ids) if sid not in bad]
    ids = [es.ids[i] for i in keep]
    x = normalize_rows(ids, es.matrix[keep]) if ids else np.zeros((0, 1), np.float32)
    row_of = {sid: i for i, sid in enumerate(ids)}
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    for g, part in used.groupby("subgroup", sort=True):
        rows = [row_of[r] for r in part["ref_id"] if r in row_of]
        if not rows:
            log.warning("subgroup %s: no reference embedding, nothing retrieved", g)
            continue
        q = x[rows]
        if cfg.retrieval == "centroid":
            c = q.astype(np.float64).sum(0)
            q = (c / max(np.linalg.norm(c), 1e-30)).astype(np.float32)[None, :]
            out[str(g)] = ([f"centroid:{g}"], q)
        else:
            out[str(g)] = ([ids[r] for r in rows], q)
    return out


def mine_candidates(
    queries: dict[str, tuple[list[str], np.ndarray]],
    pool_emb: str | os.PathLike,
    cfg: TargetedConfig,
    allowed_ids: Iterable[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """(candidates: subgroup, pool_id, similarity, ref_id; pool id -> shard), best per (subgroup, image)."""
    k = cfg.budget_per_subgroup * cfg.oversample
    miners = {g: NeighbourMiner(names, q, k) for g, (names, q) in queries.items()}
    include = set(allowed_ids) if allowed_ids is not None else None
    shard_of: dict[str, str] = {}
    n_pool = 0
    for f in embedding_files(pool_emb):
        es = read_embeddings(f, cfg.embed_kind, include)
        bad = invalid_rows(es.ids, es.matrix)
        ok = [i for i, sid in enumerate(es.ids) if sid not in bad]
        ids = [es.ids[i] for i in ok]
        if not ids:
            continue
        x = normalize_rows(ids, es.matrix[ok])
        shard_of.update({es.ids[i]: es.shards[i] for i in ok})
        n_pool += len(ids)
        for m in miners.values():
            m.add(ids, x)
    log.info("retrieval: searched %d pool images for %d subgroups", n_pool, len(miners))
    parts = []
    for g, m in miners.items():
        t = m.result(g).to_pandas()
        t = t.sort_values(["similarity", "sample_id"], ascending=[False, True]).drop_duplicates("sample_id")
        parts.append(pd.DataFrame({"subgroup": g, "pool_id": t["sample_id"], "similarity": t["similarity"],
                                   "ref_id": t["eval_id"]}))
    cand = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["subgroup", "pool_id", "similarity", "ref_id"])
    return cand, shard_of


def assign(cand: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Greedy unique assignment by descending similarity under a per-subgroup budget (see module doc)."""
    order = cand.sort_values(["similarity", "subgroup", "pool_id"], ascending=[False, True, True], kind="stable")
    used: set[str] = set()
    count: dict[str, int] = {}
    take = []
    for r in order.itertuples(index=False):
        if r.pool_id in used or count.get(r.subgroup, 0) >= budget:
            continue
        used.add(r.pool_id)
        count[r.subgroup] = count.get(r.subgroup, 0) + 1
        take.append(r)
    return pd.DataFrame(take, columns=cand.columns)


def retrieve(
    ref: pd.DataFrame,
    ref_emb: str | os.PathLike,
    pool_emb: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TargetedConfig,
    allowed_ids: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Retrieve images per subgroup; write `<out>/targeted/retrieved.parquet` and `ledger/tg_retrieve/`.

    Returns the retrieved table (`RETRIEVED_COLUMNS`), ordered by subgroup and rank, with the generation
    shard (`gen-NNNNNN`, `cfg.shard_size` images each) of every row.
    """
    queries = subgroup_queries(ref, ref_emb, cfg)
    cand, shard_of = mine_candidates(queries, pool_emb, cfg, allowed_ids)
    got = assign(cand, cfg.budget_per_subgroup)
    got = got.sort_values(["subgroup", "similarity", "pool_id"], ascending=[True, False, True], kind="stable")
    got["rank"] = got.groupby("subgroup").cumcount()
    got = got.reset_index(drop=True)
    got["gen_id"] = [generated_id(p) for p in got["pool_id"]]
    got["pool_shard"] = [shard_of[p] for p in got["pool_id"]]
    got["family"] = [cfg.family_of(g) for g in got["subgroup"]]
    got["gen_shard"] = [f"gen-{i // cfg.shard_size:06d}" for i in range(len(got))]
    got = got[RETRIEVED_COLUMNS]
    for g in queries:
        n = int((got["subgroup"] == g).sum())
        if n < cfg.budget_per_subgroup:
            log.warning("subgroup %s: %d images retrieved, budget %d (pool too small or taken)", g, n,
                        cfg.budget_per_subgroup)
    out = Path(out_dir)
    buf = io.BytesIO()
    got.to_parquet(buf, index=False)
    write_atomic(out / "targeted" / "retrieved.parquet", buf.getvalue())
    picked = got.set_index("pool_id")
    best = cand.sort_values(["similarity", "subgroup"], ascending=[False, True]).drop_duplicates("pool_id")
    with LedgerWriter(step_dir(out, STEP) / "part-retrieve.parquet", STEP) as led:
        for r in best.sort_values("pool_id").itertuples(index=False):
            if r.pool_id in picked.index:
                p = picked.loc[r.pool_id]
                led.add(r.pool_id, "keep", "", float(p.similarity), shard_of[r.pool_id], subgroup=p.subgroup,
                        ref_id=p.ref_id, gen_id=p.gen_id, rank=int(p["rank"]))
            else:
                led.add(r.pool_id, "drop", "retrieval_over_budget", float(r.similarity), shard_of[r.pool_id],
                        nearest_subgroup=r.subgroup)
    return got
