"""Reference subgroups: the kinds of question of a target task's reference set (its train/val split).

A subgroup comes from a field of the reference records (`source`, `metadata.<key>`) or from spherical
k-means (the SemDeDup k-means, core/steps/dedup/kmeans.py) on MiniLM embeddings of the reference questions.
Every reference sample gets one row: used (with its subgroup) or excluded with a reason (`no_image`:
the subgroup's images are what retrieval looks for; `no_subgroup_field`; `subgroup_not_included`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from core.foundation.sample import Sample, strip_image_placeholders
from core.steps.rephrase.config import DEFAULT_KEEP_SUFFIXES
from core.targeted.config import FAMILIES, TargetedConfig

log = logging.getLogger(__name__)
COLUMNS = ["ref_id", "shard", "subgroup", "family", "question", "answer", "used", "reason"]


SUFFIXES = tuple(dict.fromkeys([*DEFAULT_KEEP_SUFFIXES, *(f.question_suffix for f in FAMILIES.values() if f.question_suffix)]))


def first_pair(sample: Sample, suffixes: Iterable[str] = SUFFIXES) -> tuple[str, str]:
    """The first question (placeholders and a trailing answer-format instruction removed) and its answer."""
    q = strip_image_placeholders(sample.human_texts()[0])
    for suf in suffixes:
        if q.endswith(suf) and q[: -len(suf)].strip():
            q = q[: -len(suf)].rstrip()
            break
    return q, sample.assistant_texts()[0].strip()


def field_value(sample: Sample, name: str) -> str:
    """`source`, `id` or `metadata.<key>` of a sample as a string ('' when absent)."""
    if name.startswith("metadata."):
        v = sample.metadata.get(name.split(".", 1)[1])
        return "" if v is None else str(v)
    if name in ("source", "id"):
        return str(getattr(sample, name) or "")
    raise ValueError(f"subgroup_field {name!r}: use 'source', 'id' or 'metadata.<key>'")


def cluster_questions(questions: list[str], k: int, seed: int, encoder: Any = None) -> np.ndarray:
    """Cluster labels (0..k-1) of the questions: spherical k-means on MiniLM vectors (packaged model)."""
    from core.steps.dedup.semdedup import assign_clusters, spherical_kmeans
    from core.steps.rephrase.similarity import SimilarityScorer

    encoder = encoder or SimilarityScorer("minilm", device="cpu")
    x = encoder.embed(questions)
    cent = spherical_kmeans(x, k, niter=25, seed=seed)
    labels, _ = assign_clusters(x, cent)
    return labels


def build_subgroups(samples: Iterable[Sample], cfg: TargetedConfig, encoder: Any = None) -> pd.DataFrame:
    """One row per reference sample (`COLUMNS`), in input order; `used` rows define the subgroups."""
    rows: list[dict[str, Any]] = []
    for s in samples:
        q, a = first_pair(s)
        row = {"ref_id": s.id, "shard": s.shard, "subgroup": "", "question": q, "answer": a, "used": True,
               "reason": ""}
        if not s.images:
            row.update(used=False, reason="no_image")
        elif cfg.subgroup_field:
            row["subgroup"] = field_value(s, cfg.subgroup_field)
            if not row["subgroup"]:
                row.update(used=False, reason="no_subgroup_field")
        rows.append(row)
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "family"])
    if not cfg.subgroup_field:
        idx = df.index[df["used"]]
        if len(idx):
            labels = cluster_questions(df.loc[idx, "question"].tolist(), cfg.n_clusters, cfg.seed, encoder)
            df.loc[idx, "subgroup"] = [f"cluster_{int(c):02d}" for c in labels]
    if cfg.include_subgroups:
        out = df["used"] & ~df["subgroup"].isin(cfg.include_subgroups)
        df.loc[out, "used"] = False
        df.loc[out, "reason"] = "subgroup_not_included"
        absent = set(cfg.include_subgroups) - set(df.loc[df["used"], "subgroup"])
        if absent:
            raise ValueError(f"include_subgroups {sorted(absent)} have no reference sample with an image")
    df["family"] = [cfg.family_of(g) if u else "" for g, u in zip(df["subgroup"], df["used"])]
    if not df["used"].any():
        raise ValueError("no reference sample defines a subgroup (need images and the subgroup field)")
    log.info("subgroups: %s", df[df["used"]].groupby("subgroup").size().to_dict())
    return df[COLUMNS]


def subgroup_examples(df: pd.DataFrame, n: int) -> dict[str, list[dict[str, str]]]:
    """Up to n (question, answer) examples per subgroup, in reference order (deck and prompts)."""
    out: dict[str, list[dict[str, str]]] = {}
    for g, part in df[df["used"]].groupby("subgroup", sort=True):
        out[str(g)] = [{"ref_id": r.ref_id, "question": r.question, "answer": r.answer} for r in part.head(n).itertuples()]
    return out
