"""Domains: a sample's domain from a field of the source, or from k-means on the existing embeddings.

The step writes a ledger (`ledger/domains/part-all.parquet`, step `domains`): `keep` with the domain in
`extra.domain` for every assigned sample, `quarantine` with a reason (`no_domain`, `domain_no_embedding:<kind>`,
`domain_name_invalid`, `domain_name_collision:<name>`) for the rest, and `domains/domains.json` ({domain: [ids]}).

Domain names become folder names (`train/<domain>`, `heldout/<domain>`) and soup URIs (`soup/a+b`), so a name
from the data is mapped to a slug of [A-Za-z0-9_.-] that starts with a letter, digit or `_` (`/`, NUL, control
characters and spaces become `_`; leading/trailing `_` and `.` are stripped), at most 100 characters. A name
whose slug is empty (`.`, `..`, `///`, only control characters) is quarantined `domain_name_invalid`; two
different names with one slug (`a/b` and `a_b`) are not merged: the name that is its own slug keeps it and the
others are quarantined `domain_name_collision:<slug>` (all of them when none is). `check_domain_name` refuses
an unsafe name wherever a folder is made from one (a hand-written domains.json included).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.foundation.configs import ConfigJSON, override, register_preset
from core.foundation.ledger import LedgerWriter, step_dir

STEP = "domains"
DOMAIN_FIELDS = ("domain", "source", "dataset")
_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # fullmatch: never `.`/`..`, no `/`, no `+`/`=`
MAX_NAME = 100


def domain_of(sample: Any) -> str:
    """The sample's domain: `sample.domain` (when the Sample model has it), else `metadata['domain']`,
    `metadata['dataset']`, else `sample.source`; "" when none is set."""
    d = getattr(sample, "domain", "") or ""
    meta = getattr(sample, "metadata", None) or {}
    d = d or meta.get("domain") or meta.get("dataset") or getattr(sample, "source", "") or ""
    return str(d)


def clean_name(name: str) -> str:
    """A domain name usable in soup URIs and folder names (see the module docstring): the slug of `name`, or ""
    when nothing safe is left (`.`, `..`) or the slug is longer than `MAX_NAME`."""
    slug = _BAD.sub("_", name.strip()).strip("_.")
    return slug if SAFE_NAME.fullmatch(slug) else ""


def check_domain_name(name: str) -> str:
    """`name` if it is safe as a folder name and in a soup URI; else ValueError saying why."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ValueError(f"domain name {name!r} is not a safe folder name: it must match [A-Za-z0-9_][A-Za-z0-9_.-]* "
                         f"(at most {MAX_NAME} characters; `.` and `..` are refused); assign_domains maps names "
                         "from the data to such slugs")
    return name


@dataclass
class DomainConfig(ConfigJSON):
    """`mode`: `field` (domain_of) or `kmeans` (on `embed_kind` embeddings, `k` clusters).
    `min_samples`: domains smaller than this are merged into nothing: their samples are quarantined
    `domain_too_small` (an expert needs at least one batch). `include`: keep only these domains (empty: all).
    On the command line a partial JSON onto the `field` preset, e.g. `'{"mode": "kmeans", "k": 6}'`."""

    mode: str = "field"
    k: int = 4
    embed_kind: str = "image"
    seed: int = 0
    min_samples: int = 1
    include: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("field", "kmeans"):
            raise ValueError(f"mode {self.mode!r} not in (field, kmeans)")
        if self.mode == "kmeans" and self.k < 2:
            raise ValueError("kmeans needs k >= 2")
        if self.embed_kind not in ("image", "text"):
            raise ValueError(f"embed_kind {self.embed_kind!r} not in (image, text)")
        self.include = list(self.include)


@register_preset(DomainConfig, "field", default=True)
def field_domain_config(**overrides: Any) -> DomainConfig:
    """Domains from a field of the source (`domain`, `metadata.domain` / `dataset`, `source`)."""
    cfg = DomainConfig()
    return override(cfg, **overrides) if overrides else cfg


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
    raws: dict[str, set[str]] = {}  # slug -> the names from the data that map to it
    raw_of: dict[str, str] = {}
    for s in samples:
        if cfg.mode == "kmeans":
            d = by_id.get(s.id, "")
            if not d:
                reasons[s.id] = f"domain_no_embedding:{cfg.embed_kind}"
        else:
            raw = domain_of(s)
            raw_of[s.id] = raw
            d = clean_name(raw)
            if not raw:
                reasons[s.id] = "no_domain"
            elif not d:
                reasons[s.id] = "domain_name_invalid"
        if d and cfg.include and d not in cfg.include:
            reasons[s.id] = f"domain_excluded:{d}"
            d = ""
        decided.append((s.id, getattr(s, "shard", "") or "", d))
        if cfg.mode == "field" and d:
            raws.setdefault(d, set()).add(raw)
    for slug, names in raws.items():  # different names with one slug are different domains: never merged
        if len(names) > 1:
            losers = {n for n in names if n.strip() != slug}
            for i, (sid, shard, d) in enumerate(decided):
                if d == slug and sid not in reasons and raw_of[sid] in losers:
                    reasons[sid] = f"domain_name_collision:{slug}"
                    decided[i] = (sid, shard, "")
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
    """{domain: [ids]} written by `assign_domains`; ValueError when a name is not safe as a folder name
    (`check_domain_name`: a domains.json written by hand or by an older version)."""
    groups = json.loads((Path(out) / STEP / "domains.json").read_text())
    for d in groups:
        check_domain_name(d)
    return groups
