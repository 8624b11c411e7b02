"""One chunk of rephrasing: plan the requests of each sample, generate, assemble and validate candidates.

Pure per-chunk work (no files): `core.steps.rephrase.step.RephraseStep` runs it chunk by chunk over a shard and
publishes the results. Every request's seed derives from (seed, sample id, turn index), so results do not
depend on chunking, batching or the resume point.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Sequence
from typing import Any

from core.foundation.sample import Sample, Turn, strip_image_placeholders
from core.steps.rephrase.config import RephraseConfig
from core.steps.rephrase.generate import Generator, Messages
from core.steps.rephrase.similarity import SimilarityScorer
from core.steps.rephrase.tokens import TokenCounter
from core.steps.rephrase.validate import Protected, protect, validate_rephrasing


def request_seed(seed: int, sample_id: str, turn: int) -> int:
    """Stable 31-bit seed of one request: independent of batching, chunking and resume point."""
    h = hashlib.sha256(f"{seed}\0{sample_id}\0{turn}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _fill(template: str, text: str, question: str) -> str:
    # plain replace, not str.format: user templates and sample texts may contain braces
    return template.replace("{question}", question).replace("{text}", text)


def plan_sample(sample: Sample, cfg: RephraseConfig) -> tuple[list[tuple[int, Protected, Messages]], str]:
    """The requests for one sample: (turn index, protected turn, chat messages) per turn to rephrase,
    or an empty list and a skip reason (``too_long``: a turn exceeds max_turn_chars, ``too_short``:
    no turn is long enough to be worth rephrasing)."""
    if any(len(t.value) > cfg.max_turn_chars for t in sample.conversations):
        return [], "too_long"
    plans = []
    question = ""
    for i, t in enumerate(sample.conversations):
        if not (t.is_human or t.is_assistant):
            continue  # system turns are copied unchanged
        p = protect(t.value, cfg.keep_suffixes)
        if t.is_human:
            question = strip_image_placeholders(p.body)
        if len(strip_image_placeholders(p.body)) < cfg.min_turn_chars:
            continue
        template = cfg.human_prompt if t.is_human else cfg.gpt_prompt
        msgs: Messages = []
        if cfg.system_prompt:
            msgs.append({"role": "system", "content": cfg.system_prompt})
        msgs.append({"role": "user", "content": _fill(template, p.body, question)})
        plans.append((i, p, msgs))
    return plans, ("" if plans else "too_short")


def prepare_chunk(samples: Sequence[Sample], cfg: RephraseConfig) -> tuple[list, list[Messages], list[int]]:
    """Plans of a chunk's samples plus the flat request list and per-request seeds."""
    plans = [plan_sample(s, cfg) for s in samples]
    requests, seeds = [], []
    for s, (turn_plans, _) in zip(samples, plans):
        for ti, _p, msgs in turn_plans:
            requests.append(msgs)
            seeds.append(request_seed(cfg.seed, s.id, ti))
    return plans, requests, seeds


def generate_chunk(generator: Generator, requests: list[Messages], seeds: list[int]) -> tuple[list, float]:
    """Run the generator on a chunk's requests; returns the generations and the seconds it took."""
    t0 = time.perf_counter()
    gens = generator.generate(requests, seeds) if requests else []
    if len(gens) != len(requests):
        raise RuntimeError(f"generator returned {len(gens)} answers for {len(requests)} requests")
    return gens, time.perf_counter() - t0


def rephrase_chunk(
    samples: Sequence[Sample],
    generator: Generator,
    counter: TokenCounter,
    cfg: RephraseConfig,
    scorer: SimilarityScorer | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Rephrase and validate one chunk. Returns ledger-ready rows and the seconds spent generating."""
    plans, requests, seeds = prepare_chunk(samples, cfg)
    gens, t_gen = generate_chunk(generator, requests, seeds)
    return finish_chunk(samples, plans, gens, counter, cfg, scorer), t_gen


def _turn_similarities(pairs: list[tuple[Sample, list[Turn]]], scorer: SimilarityScorer) -> list[list[float]]:
    """Per (sample, candidate) pair, the similarity of each changed turn (one batched encoder call)."""
    a, b, owner = [], [], []
    for k, (s, cand) in enumerate(pairs):
        for old, new in zip(s.conversations, cand):
            if old.value != new.value:
                a.append(strip_image_placeholders(old.value))
                b.append(strip_image_placeholders(new.value))
                owner.append(k)
    out: list[list[float]] = [[] for _ in pairs]
    for k, x in zip(owner, scorer.similarity(a, b)):
        out[k].append(x)
    return out


def finish_chunk(
    samples: Sequence[Sample],
    plans: list,
    gens: list,
    counter: TokenCounter,
    cfg: RephraseConfig,
    scorer: SimilarityScorer | None = None,
) -> list[dict[str, Any]]:
    """Assemble candidates from the generations, count tokens, validate: ledger-ready rows."""
    gen_iter = iter(gens)
    candidates: list[list[Turn]] = []
    finishes: list[list[str]] = []
    gen_tokens: list[int] = []
    for s, (turn_plans, _) in zip(samples, plans):
        turns = list(s.conversations)
        fin = ["copied"] * len(turns)
        n_gen = 0
        for ti, p, _msgs in turn_plans:
            g = next(gen_iter)
            turns[ti] = Turn(turns[ti].role, p.restore(g.text))
            fin[ti] = g.finish_reason
            n_gen += g.n_tokens
        candidates.append(turns)
        finishes.append(fin)
        gen_tokens.append(n_gen)
    old_counts = counter.count([s.conversations for s in samples])
    new_counts = counter.count(candidates)
    rows = []
    for s, (_plans, skip), cand, fin, old, new, ng in zip(
        samples, plans, candidates, finishes, old_counts, new_counts, gen_tokens
    ):
        row: dict[str, Any] = {"sample_id": s.id, "shard": s.shard, "old_tokens": old, "gen_tokens": ng}
        if skip:
            row.update(decision="keep", reason=f"rephrase_skipped:{skip}", new_tokens=old)
        else:
            why = validate_rephrasing(
                s.conversations,
                cand,
                fin,
                old,
                new,
                min_shortening=cfg.min_shortening,
                check_numbers=cfg.check_numbers,
                refusal_patterns=cfg.refusal_patterns,
            )
            row["new_tokens"] = new
            row["candidate"] = [{"from": t.role, "value": t.value} for t in cand]
            row["original"] = [{"from": t.role, "value": t.value} for t in s.conversations]
            if why is None:
                row.update(decision="modify", reason="rephrased")
            else:
                row.update(decision="keep", reason=f"rephrase_rejected:{why}")
        rows.append(row)
    # The meaning check is the only expensive one (a neural encoder): it runs last, and only on the
    # candidates that passed every other check.
    passed = [k for k, r in enumerate(rows) if r["decision"] == "modify"]
    if scorer is not None and passed:
        sims = _turn_similarities([(samples[k], candidates[k]) for k in passed], scorer)
        for k, sim in zip(passed, sims):
            rows[k]["min_similarity"] = round(min(sim), 4) if sim else 1.0
            if sim and min(sim) < cfg.min_similarity:
                rows[k].update(decision="keep", reason="rephrase_rejected:meaning_changed")
    return rows


def pick_examples(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to n accepted and n rejected rephrasings (rejected: round-robin over reasons)."""
    out = [r for r in rows if r["decision"] == "modify"][:n]
    by_reason: dict[str, list] = {}
    for r in rows:
        if r["decision"] == "keep" and "candidate" in r:
            by_reason.setdefault(r["reason"], []).append(r)
    rejected = [r for group in itertools.zip_longest(*by_reason.values()) for r in group if r is not None]
    return [
        {k: r[k] for k in ("sample_id", "decision", "reason", "old_tokens", "new_tokens", "original", "candidate")}
        for r in out + rejected[:n]
    ]
