"""Streaming, resumable turn-level rephrasing over shards.

Layout inside a run directory (see docs/architecture.md):

    ledger/rephrase/part-<shard>.parquet      decision per sample: modify (accepted) or keep (+ reason)
    rephrase/records/part-<shard>.parquet     sample_id, conversations_json of accepted samples (export input)
    rephrase/examples/part-<shard>.jsonl      a few before/after examples (accepted and rejected)
    rephrase/work/<shard>/chunk-<i>.json      finished chunks of the shard in flight (deleted when done)

A shard is processed in chunks of `chunk_size` samples in reader order; every finished chunk is
written atomically, so a crash loses at most one chunk. When all chunks of a shard are done, the
records, examples and finally the ledger part are published (each atomically, the ledger last), and
the chunk files are removed. A re-run skips shards whose ledger part exists and, inside the shard in
flight, chunks already on disk. Every request's seed derives from (seed, sample id, turn index).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.ledger import LedgerWriter, step_dir
from core.log import progress
from core.rephrase.config import RephraseConfig
from core.rephrase.generate import Generator, Messages
from core.rephrase.similarity import SimilarityScorer
from core.rephrase.tokens import TokenCounter
from core.rephrase.validate import Protected, protect, validate_rephrasing
from core.sample import Sample, Turn, strip_image_placeholders

log = logging.getLogger(__name__)

STEP = "rephrase"
RECORDS_SCHEMA = pa.schema([("sample_id", pa.string()), ("conversations_json", pa.string())])


@dataclass
class ShardSummary:
    """What one call to `rephrase_shard` did (timings cover this call only, not resumed chunks)."""

    shard: str
    n_samples: int = 0
    n_modified: int = 0
    chunks_done: int = 0
    chunks_resumed: int = 0
    skipped: bool = False
    seconds_total: float = 0.0
    seconds_generate: float = 0.0
    generated_tokens: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def ledger_part(run_dir: str | os.PathLike, shard: str) -> Path:
    return step_dir(run_dir, STEP) / f"part-{shard}.parquet"


def rephrase_shard(
    shard: str,
    samples: Iterable[Sample],
    run_dir: str | os.PathLike,
    cfg: RephraseConfig,
    generator: Generator,
    counter: TokenCounter,
    quarantine: LedgerWriter | None = None,
    scorer: SimilarityScorer | None = None,
    bar: Any = None,
) -> ShardSummary:
    """Rephrase one shard's samples (reader order) into the run directory; resumable (see module doc).

    `quarantine`, when given, is the reader's quarantine writer for this shard: it is closed (published)
    after every sample was read and before the ledger part, so a finished shard has both.
    `bar`: an optional progress bar (core.log.progress) advanced by each chunk's samples."""
    t_start = time.perf_counter()
    summary = ShardSummary(shard)
    run = Path(run_dir)
    part = ledger_part(run, shard)
    if part.exists():
        summary.skipped = True
        return summary
    work = run / STEP / "work" / shard
    work.mkdir(parents=True, exist_ok=True)
    done = {int(p.stem.split("-")[1]) for p in work.glob("chunk-*.json")}
    it = iter(samples)
    if scorer is None and cfg.similarity_model:
        scorer = SimilarityScorer(cfg.similarity_model, device=cfg.device)

    def finish(ci: int, chunk: list[Sample], plans: list, gens: list) -> None:
        rows = finish_chunk(chunk, plans, gens, counter, cfg, scorer)
        _write_atomic(work / f"chunk-{ci:06d}.json", json.dumps(rows, ensure_ascii=False).encode("utf-8"))
        summary.chunks_done += 1
        summary.generated_tokens += sum(r["gen_tokens"] for r in rows)

    # Validation and I/O of chunk k run in a worker thread while chunk k+1 generates (vLLM's engine
    # and torch kernels release the GIL). A failed generation waits for the chunk being finished, so
    # a crash still loses only the chunk in flight.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = None
        try:
            for ci in itertools.count():
                chunk = list(itertools.islice(it, cfg.chunk_size))
                if not chunk:
                    break
                if bar is not None:
                    bar.update(len(chunk))
                if ci in done:
                    summary.chunks_resumed += 1
                    continue
                plans, requests, seeds = prepare_chunk(chunk, cfg)
                gens, t_gen = generate_chunk(generator, requests, seeds)
                summary.seconds_generate += t_gen
                log.info("rephrase %s chunk %d: %d samples, %.1fs generating", shard, ci, len(chunk), t_gen)
                if pending is not None:
                    pending.result()
                if cfg.overlap_io:
                    pending = pool.submit(finish, ci, chunk, plans, gens)
                else:
                    pending = None
                    finish(ci, chunk, plans, gens)
        finally:
            if pending is not None:
                wait([pending])
        if pending is not None:
            pending.result()
    if quarantine is not None and sum(quarantine.counts.values()):
        quarantine.close()
    _finalize_shard(run, shard, work, cfg, summary)
    summary.seconds_total = time.perf_counter() - t_start
    return summary


def _finalize_shard(run: Path, shard: str, work: Path, cfg: RephraseConfig, summary: ShardSummary) -> None:
    rows: list[dict[str, Any]] = []
    for p in sorted(work.glob("chunk-*.json")):
        rows.extend(json.loads(p.read_text("utf-8")))
    accepted = [r for r in rows if r["decision"] == "modify"]
    table = pa.Table.from_pydict(
        {
            "sample_id": [r["sample_id"] for r in accepted],
            "conversations_json": [json.dumps(r["candidate"], ensure_ascii=False) for r in accepted],
        },
        schema=RECORDS_SCHEMA,
    )
    rec_path = run / STEP / "records" / f"part-{shard}.parquet"
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(rec_path) + ".tmp")
    os.replace(str(rec_path) + ".tmp", rec_path)
    examples = _pick_examples(rows, cfg.n_examples)
    _write_atomic(
        run / STEP / "examples" / f"part-{shard}.jsonl",
        "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode("utf-8"),
    )
    with LedgerWriter(ledger_part(run, shard), STEP) as led:
        for r in rows:
            old, new = r["old_tokens"], r["new_tokens"]
            led.add(
                r["sample_id"],
                r["decision"],
                r["reason"],
                score=(new / old) if old else 1.0,
                shard=r["shard"] or shard,
                old_tokens=old,
                new_tokens=new,
                gen_tokens=r["gen_tokens"],
            )
            summary.reasons[r["reason"]] = summary.reasons.get(r["reason"], 0) + 1
    summary.n_samples = len(rows)
    summary.n_modified = len(accepted)
    shutil.rmtree(work)
    try:
        work.parent.rmdir()  # rephrase/work/ once no shard is in flight
    except OSError:
        pass


def _pick_examples(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
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


def rephrase_shards(
    shards: Sequence[tuple[str, Callable[[], Iterable[Sample]]]],
    run_dir: str | os.PathLike,
    cfg: RephraseConfig,
    generator: Generator,
    counter: TokenCounter | None = None,
    scorer: SimilarityScorer | None = None,
) -> list[ShardSummary]:
    """Rephrase shards in order. `shards` pairs a shard name with a function that opens its samples
    (called only for shards not finished yet)."""
    counter = counter or TokenCounter(cfg.tokenizer_path)
    out = []
    bar = progress(desc="rephrase", unit="sample")
    for name, open_samples in shards:
        if ledger_part(run_dir, name).exists():
            log.info("rephrase %s: ledger part exists, skipped", name)
            out.append(ShardSummary(name, skipped=True))
            continue
        if scorer is None and cfg.similarity_model:
            scorer = SimilarityScorer(cfg.similarity_model, device=cfg.device)
        s = rephrase_shard(name, open_samples(), run_dir, cfg, generator, counter, scorer=scorer, bar=bar)
        log.info("rephrase %s: %d samples, %d modified, reasons %s", name, s.n_samples, s.n_modified, s.reasons)
        out.append(s)
    bar.close()
    return out


def read_rephrased(run_dir: str | os.PathLike) -> dict[str, list[Turn]]:
    """All accepted rephrasings of a run: sample id -> new conversation (for the export step)."""
    out: dict[str, list[Turn]] = {}
    for p in sorted((Path(run_dir) / STEP / "records").glob("part-*.parquet")):
        t = pq.read_table(p)
        for sid, conv in zip(t.column("sample_id").to_pylist(), t.column("conversations_json").to_pylist()):
            out[sid] = [Turn(d["from"], d["value"]) for d in json.loads(conv)]
    return out


def rephrase_run(
    shards_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: RephraseConfig,
    prev_ledger: str | os.PathLike | None = None,
    generator: Generator | None = None,
    counter: TokenCounter | None = None,
    scorer: SimilarityScorer | None = None,
) -> list[ShardSummary]:
    """Rephrase every WDS shard of `shards_dir` (a run directory with `shards/`, or a shard folder/URL)
    into `out_dir` (ledger/rephrase/ + rephrase/), restricted to the ids that passed the previous step
    when `prev_ledger` (a ledger file or directory) is given. Images are not decoded (text-only step).

    Records the reader cannot parse are quarantined in `ledger/rephrase/quarantine-<shard>.parquet`;
    expected ids found in no shard are quarantined as `missing_from_shard`. Re-running with the same
    `out_dir` resumes. The model is loaded only if some shard is unfinished.
    """
    from core.ledger import passing_ids, read_ledger
    from core.rephrase.generate import make_generator
    from core.wds import iter_shard, list_shards, shard_name

    include = set(passing_ids(read_ledger(prev_ledger))) if prev_ledger else None
    root = Path(shards_dir)
    urls = list_shards(str(root / "shards")) if (root / "shards").is_dir() else list_shards(str(shards_dir))
    out = []
    bar = progress(desc="rephrase", total=len(include) if include is not None else None, unit="sample")
    for url in urls:
        name = shard_name(url)
        if ledger_part(out_dir, name).exists():
            out.append(ShardSummary(name, skipped=True))
            continue
        generator = generator or make_generator(cfg)
        counter = counter or TokenCounter(cfg.tokenizer_path)
        if scorer is None and cfg.similarity_model:
            scorer = SimilarityScorer(cfg.similarity_model, device=cfg.device)
        q = LedgerWriter(step_dir(out_dir, STEP) / f"quarantine-{name}.parquet", STEP)
        samples = iter_shard(url, quarantine=q, include_ids=include, load_images=False, verify_images=False)
        s = rephrase_shard(name, samples, out_dir, cfg, generator, counter, quarantine=q, scorer=scorer, bar=bar)
        log.info("rephrase %s: %d samples, %d modified, reasons %s", name, s.n_samples, s.n_modified, s.reasons)
        out.append(s)
    bar.close()
    if not urls and not step_dir(out_dir, STEP).is_dir():  # a degenerate run: the step still writes its ledger
        LedgerWriter(step_dir(out_dir, STEP) / "part-empty.parquet", STEP).close()
        rec_path = Path(out_dir) / STEP / "records" / "part-empty.parquet"  # and an empty records table
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(RECORDS_SCHEMA.empty_table(), rec_path)
    if include is not None:
        missing_path = step_dir(out_dir, STEP) / "part-missing.parquet"
        decided = set(read_ledger(step_dir(out_dir, STEP))["sample_id"]) if step_dir(out_dir, STEP).is_dir() else set()
        missing = sorted(include - decided)
        if missing and not missing_path.exists():
            with LedgerWriter(missing_path, STEP) as led:
                for sid in missing:
                    led.add(sid, "quarantine", "missing_from_shard")
    return out
