"""Subset search over soups: exhaustive power set, greedy forward selection, beam search, and a surrogate
(ridge regression on inclusion indicators + pairwise interactions) that proposes the next subsets.

Every strategy talks to an `Oracle`: `oracle(subsets) -> scores`, called with a batch (one eval fan-out per
round) and counting distinct evaluations, so strategies are compared by evaluations used. Subsets are
frozensets of domain names.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Subset = frozenset
EXHAUSTIVE_MAX_K = 8


def power_set(domains: Sequence[str]) -> list[frozenset[str]]:
    """All 2^k - 1 non-empty subsets, by size then name."""
    out = [frozenset(c) for r in range(1, len(domains) + 1) for c in itertools.combinations(sorted(domains), r)]
    return out


class Oracle:
    """Wraps a batch scorer `fn(list[subset]) -> list[float]`, caches results and counts evaluations."""

    def __init__(self, fn: Callable[[list[frozenset[str]]], Sequence[float]]):
        self.fn = fn
        self.cache: dict[frozenset[str], float] = {}
        self.order: list[frozenset[str]] = []
        self.rounds = 0

    @classmethod
    def from_table(cls, table: Mapping[frozenset[str], float]) -> Oracle:
        """An oracle that looks scores up in a precomputed table (tests, benchmark, offline replay)."""
        return cls(lambda subs: [table[s] for s in subs])

    def __call__(self, subsets: Iterable[frozenset[str]]) -> list[float]:
        subs = [frozenset(s) for s in subsets]
        new = list(dict.fromkeys(s for s in subs if s not in self.cache))
        if new:
            self.rounds += 1
            for s, v in zip(new, self.fn(new), strict=True):
                self.cache[s] = float(v)
                self.order.append(s)
        return [self.cache[s] for s in subs]

    @property
    def n_evals(self) -> int:
        return len(self.cache)

    def best(self) -> tuple[frozenset[str], float]:
        s = max(self.cache, key=lambda x: (self.cache[x], -len(x), sorted(x)))
        return s, self.cache[s]


@dataclass
class SearchResult:
    """Best subset found, its score, evaluations and rounds used, and the order subsets were evaluated in."""

    strategy: str
    best: frozenset[str]
    score: float
    n_evals: int
    rounds: int
    trace: list[tuple[frozenset[str], float]] = field(default_factory=list)

    def evals_to_reach(self, target: float, tol: float = 1e-12) -> int | None:
        """Evaluations used until a subset scoring >= target was first evaluated (None: never)."""
        for i, (_, v) in enumerate(self.trace, start=1):
            if v >= target - tol:
                return i
        return None


def _result(name: str, oracle: Oracle) -> SearchResult:
    s, v = oracle.best()
    return SearchResult(name, s, v, oracle.n_evals, oracle.rounds, [(x, oracle.cache[x]) for x in oracle.order])


def exhaustive(domains: Sequence[str], oracle: Oracle, max_k: int = EXHAUSTIVE_MAX_K) -> SearchResult:
    """Evaluate every non-empty subset (k <= max_k) in one round."""
    if len(domains) > max_k:
        raise ValueError(f"exhaustive search over {len(domains)} domains (> {max_k}) is 2^{len(domains)} soups; "
                         "use greedy, beam or surrogate")
    oracle(power_set(domains))
    return _result("exhaustive", oracle)


def greedy(domains: Sequence[str], oracle: Oracle) -> SearchResult:
    """Forward selection: start from the best single domain; add the domain that helps most; stop when none helps."""
    cur: frozenset[str] = frozenset()
    cur_score = -math.inf
    rest = sorted(domains)
    while rest:
        cands = [cur | {d} for d in rest]
        scores = oracle(cands)
        i = int(np.argmax(scores))
        if scores[i] <= cur_score:
            break
        cur, cur_score = cands[i], scores[i]
        rest = [d for d in rest if d not in cur]
    return _result("greedy", oracle)


def beam(domains: Sequence[str], oracle: Oracle, width: int = 3) -> SearchResult:
    """Beam search over subset size: keep the `width` best subsets of each size, expand each by one domain;
    stop when a level's best does not beat the best so far."""
    level = [frozenset({d}) for d in sorted(domains)]
    best = -math.inf
    while level:
        scores = oracle(level)
        ranked = sorted(zip(level, scores), key=lambda x: (-x[1], sorted(x[0])))[:width]
        if ranked[0][1] <= best:
            break
        best = ranked[0][1]
        nxt = {s | {d} for s, _ in ranked for d in domains if d not in s}
        level = sorted(nxt, key=sorted)
    return _result("beam", oracle)


# ---- surrogate ----------------------------------------------------------------------------------------


def features(subsets: Sequence[frozenset[str]], domains: Sequence[str], interactions: bool = True) -> np.ndarray:
    """Inclusion indicators (one column per domain) and, optionally, all pairwise products."""
    idx = {d: i for i, d in enumerate(domains)}
    x = np.zeros((len(subsets), len(domains)))
    for r, s in enumerate(subsets):
        for d in s:
            x[r, idx[d]] = 1.0
    if not interactions:
        return x
    pairs = [x[:, i] * x[:, j] for i, j in itertools.combinations(range(len(domains)), 2)]
    return np.column_stack([x, *pairs]) if pairs else x


@dataclass
class Surrogate:
    """Ridge regression on inclusion indicators + pairwise interactions (scikit-learn)."""

    domains: list[str]
    alpha: float = 1e-2
    interactions: bool = True
    model: Any = None

    def fit(self, subsets: Sequence[frozenset[str]], y: Sequence[float]) -> Surrogate:
        from sklearn.linear_model import Ridge

        self.model = Ridge(alpha=self.alpha).fit(features(subsets, self.domains, self.interactions), np.asarray(y))
        return self

    def predict(self, subsets: Sequence[frozenset[str]]) -> np.ndarray:
        return self.model.predict(features(subsets, self.domains, self.interactions))


def heldout_error(subsets: Sequence[frozenset[str]], y: Sequence[float], domains: Sequence[str], folds: int = 5,
                  alpha: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """K-fold held-out error of the surrogate on evaluated subsets: MAE, RMSE, and the scores' std for scale."""
    y = np.asarray(y, dtype=float)
    n = len(y)
    if n < 4:
        return {"mae": math.nan, "rmse": math.nan, "y_std": float(np.std(y)) if n else math.nan, "n": n, "folds": 0}
    folds = min(folds, n)
    perm = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    for f in range(folds):
        test = perm[f::folds]
        train = np.setdiff1d(perm, test)
        m = Surrogate(list(domains), alpha).fit([subsets[i] for i in train], y[train])
        pred[test] = m.predict([subsets[i] for i in test])
    err = pred - y
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())), "y_std": float(y.std()),
            "n": n, "folds": folds}


def _candidates(domains: Sequence[str], seen: set[frozenset[str]], rng: np.random.Generator,
                max_candidates: int) -> list[frozenset[str]]:
    """Unevaluated subsets: all of them when the power set is small, else a random sample."""
    k = len(domains)
    if 2 ** k - 1 <= max_candidates:
        return [s for s in power_set(domains) if s not in seen]
    out: set[frozenset[str]] = set()
    for _ in range(max_candidates * 2):
        mask = rng.random(k) < 0.5
        s = frozenset(d for d, m in zip(domains, mask) if m)
        if s and s not in seen:
            out.add(s)
        if len(out) >= max_candidates:
            break
    return sorted(out, key=sorted)


def surrogate_search(domains: Sequence[str], oracle: Oracle, init: int | None = None, per_round: int = 4,
                     budget: int | None = None, alpha: float = 1e-2, seed: int = 0, patience: int = 2,
                     max_candidates: int = 4096) -> SearchResult:
    """Evaluate all singletons and a few random subsets, then repeatedly fit the surrogate and evaluate the
    `per_round` unevaluated subsets it predicts best; stop at `budget` evaluations or after `patience` rounds
    without improvement."""
    rng = np.random.default_rng(seed)
    k = len(domains)
    n_feat = k + k * (k - 1) // 2
    budget = budget if budget is not None else 2 ** k - 1
    init = init if init is not None else min(2 ** k - 1, max(k + 2, n_feat // 2))
    start = [frozenset({d}) for d in sorted(domains)]
    pool = [s for s in _candidates(domains, set(start), rng, max_candidates) if len(s) > 1]
    rng.shuffle(pool)
    oracle(start + pool[: max(0, init - len(start))])
    best = oracle.best()[1]
    stale = 0
    while oracle.n_evals < budget and stale < patience:
        seen = set(oracle.cache)
        cands = _candidates(domains, seen, rng, max_candidates)
        if not cands:
            break
        subs = list(oracle.cache)
        model = Surrogate(list(domains), alpha).fit(subs, [oracle.cache[s] for s in subs])
        pred = model.predict(cands)
        order = np.argsort(-pred, kind="stable")[: min(per_round, budget - oracle.n_evals)]
        oracle([cands[i] for i in order])
        new_best = oracle.best()[1]
        stale = 0 if new_best > best else stale + 1
        best = max(best, new_best)
    return _result("surrogate", oracle)


# ---- analysis of a score table ------------------------------------------------------------------------


def pareto_front(scores: Mapping[frozenset[str], Mapping[str, float]]) -> list[frozenset[str]]:
    """Subsets not dominated on every benchmark (>= everywhere and > somewhere) by another subset."""
    items = list(scores.items())
    front = []
    for s, a in items:
        dominated = False
        for t, b in items:
            if t == s:
                continue
            keys = a.keys()
            if all(b[k] >= a[k] for k in keys) and any(b[k] > a[k] for k in keys):
                dominated = True
                break
        if not dominated:
            front.append(s)
    return sorted(front, key=lambda x: (len(x), sorted(x)))


def marginal_contribution(table: Mapping[frozenset[str], float], domains: Sequence[str]) -> dict[str, float]:
    """Per domain: mean score over subsets that contain it minus mean over subsets (non-empty) that do not."""
    out = {}
    for d in domains:
        with_d = [v for s, v in table.items() if d in s and not math.isnan(v)]
        without = [v for s, v in table.items() if d not in s and not math.isnan(v)]
        out[d] = float(np.mean(with_d) - np.mean(without)) if with_d and without else math.nan
    return out
