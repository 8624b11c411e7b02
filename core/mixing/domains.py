"""Domains: a sample's domain from a field of the source, or from k-means on the existing embeddings.

The step writes a ledger (`ledger/domains/part-all.parquet`, step `domains`): `keep` with the domain in
`extra.domain` for every assigned sample, `quarantine` with a reason (`no_domain`, `domain_no_embedding:<kind>`,
`domain_name_invalid`) for the rest, and `domains/domains.json` ({domain: [ids]}).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.ledger import LedgerWriter, step_dir

STEP = "domains"
DOMAIN_FIELDS = ("domain", "source", "dataset")
_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def domain_of(sample: Any) -> str:
    """The sample's domain: `sample.domain` (when the Sample model has it), else `metadata['domain']`,
    `metadata['dataset']`, else `sample.source`; "" when none is set."""
    d = getattr(sample, "domain", "") or ""
    meta = getattr(sample, "metadata", None) or {}
    d = d or meta.get("domain") or meta.get("dataset") or getattr(sample, "source", "") or ""
    return str(d)


def clean_name(name: str) -> str:
    """A domain name usable in soup URIs and file names ([A-Za-z0-9_.-])."""
    return _BAD.sub("_", name.strip()).strip("_")


@dataclass
class DomainConfig:
    """`mode`: `field` (domain_of) or `kmeans` (on `embed_kind` embeddings, `k` clusters).
    `min_samples`: domains smaller than this are merged into nothing: their samples are quarantined
    `domain_too_small` (an expert needs at least one batch). `include`: keep only these domains (empty: all)."""

    mode: str = "field"
    k: int = 4
    embed_kind: str = "image"
    seed: int = 0
    min_samples: int = 1
    include: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("field", "kmeans"):
            raise ValueError(f"mode {self.mode!r} not in (field, kmeans)")
        if self.mode == "kmeans" and self.k < 2:
            raise ValueError("kmeans needs k >= 2")


def kmeans_domains(ids: Sequence[str], x: Any, k: int, seed: int = 0) -> dict[str, str]:
    """id -> `cluster<i>` by k-means (scikit-learn, n_init=10) on the rows of `x`."""
    from sklearn.cluster import KMeans

    if len(ids) < k:
        raise ValueError(f"{len(ids)} embedded samples < k={k}")
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return {sid: f"cluster{int(c)}" for sid, c in zip(ids, labels)}


def assign_domains(samples: Iterable[Any], out: str | os.PathLike, cfg: DomainConfig,
                   embeddings: tuple[Sequence[str], Any] | None = None) -> dict[str, Any]:
    """Decide each sample's domain and write the `domains` ledger and `domains/domains.json` under `out`.

    :param samples: the samples that passed the previous step (only `id`, `source`, `metadata`, `shard` are read).
    :param embeddings: (ids, matrix) for `mode="kmeans"`.
    :return: summary {domains: {name: n}, n_quarantined, reasons, mode}.
    """
    by_id: dict[str, str] = {}
    if cfg.mode == "kmeans":
        if embeddings is None:
            raise ValueError("mode=kmeans needs embeddings")
        by_id = kmeans_domains(list(embeddings[0]), embeddings[1], cfg.k, cfg.seed)
    decided: list[tuple[str, str, str]] = []  # (id, shard, domain or "")
    reasons: dict[str, str] = {}
    for s in samples:
        if cfg.mode == "kmeans":
            d = by_id.get(s.id, "")
            if not d:
                reasons[s.id] = f"domain_no_embedding:{cfg.embed_kind}"
        else:
            raw = domain_of(s)
            d = clean_name(raw)
            if not raw:
                reasons[s.id] = "no_domain"
            elif not d:
                reasons[s.id] = "domain_name_invalid"
        if d and cfg.include and d not in cfg.include:
            reasons[s.id] = f"domain_excluded:{d}"
            d = ""
        decided.append((s.id, getattr(s, "shard", "") or "", d))
    counts: dict[str, int] = {}
    for _, _, d in decided:
        if d:
            counts[d] = counts.get(d, 0) + 1
    small = {d for d, n in counts.items() if n < cfg.min_samples}
    groups: dict[str, list[str]] = {}
    led_path = step_dir(out, STEP) / "part-all.parquet"
    with LedgerWriter(led_path, STEP) as led:
        for sid, shard, d in decided:
            if d and d not in small:
                led.add(sid, "keep", shard=shard, domain=d)
                groups.setdefault(d, []).append(sid)
            else:
                reason = reasons.get(sid) or f"domain_too_small:{d}"
                led.add(sid, "quarantine", reason, shard=shard, domain=d)
    odir = Path(out) / STEP
    odir.mkdir(parents=True, exist_ok=True)
    groups = {d: sorted(v) for d, v in sorted(groups.items())}
    (odir / "domains.json").write_text(json.dumps(groups, indent=1))
    q: dict[str, int] = {}
    for sid, _, d in decided:
        if not (d and d not in small):
            r = (reasons.get(sid) or f"domain_too_small:{d}").split(":")[0]
            q[r] = q.get(r, 0) + 1
    summary = {"mode": cfg.mode, "domains": {d: len(v) for d, v in groups.items()},
               "n_quarantined": sum(q.values()), "reasons": q}
    (odir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_domains(out: str | os.PathLike) -> dict[str, list[str]]:
    """{domain: [ids]} written by `assign_domains`."""
    return json.loads((Path(out) / STEP / "domains.json").read_text())
