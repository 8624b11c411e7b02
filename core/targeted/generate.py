"""Generation over shards of retrieved images: prompts with k in-context examples of the subgroup, a VLM,
parsing into LLaVA conversations; resumable by shard like rephrasing.

Layout inside a generation output directory:

    targeted/generations/part-<gen shard>.parquet   every request: ids, prompt hash, raw output, parse result
    shards/<gen shard>-000000.tar                   accepted samples (training schema, image + json): the
                                                    run-directory layout, so the export step reads them
    ledger/tg_generate/part-<gen shard>.parquet     keep (parsed) | drop gen_rejected:<reason> |
                                                    quarantine missing_pool_image, one row per retrieved image

A shard is one unit: its records and tar are written first, the ledger part last (atomically); a re-run
skips shards whose ledger part exists, so a kill loses at most the shard in flight. Every request's seed
and in-context examples derive from (seed, generated id): the output does not depend on batching, on
which shards ran before, or on where a resumed run starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.images import image_ext
from core.ledger import LedgerWriter, step_dir
from core.rephrase.chunks import request_seed
from core.sample import Sample
from core.targeted.config import FamilyPrompt, TargetedConfig
from core.targeted.parse import parse_generation, reason_code
from core.targeted.vlm import VLMGenerator, VLMRequest
from core.wds import ShardWriter, iter_samples, shard_name

log = logging.getLogger(__name__)
STEP = "tg_generate"
SYSTEM_PROMPT = "You are a careful annotator who writes training data for vision-language models."
GEN_SCHEMA = pa.schema([
    ("gen_id", pa.string()), ("pool_id", pa.string()), ("subgroup", pa.string()), ("family", pa.string()),
    ("seed", pa.int64()), ("prompt_sha256", pa.string()), ("examples", pa.string()), ("raw", pa.string()),
    ("finish_reason", pa.string()), ("n_tokens", pa.int64()), ("reason", pa.string()),
    ("conversations_json", pa.string()),
])


@dataclass
class ShardStats:
    """What one call of `generate_shard` did (timings of this call only)."""

    shard: str
    n: int = 0
    n_accepted: int = 0
    skipped: bool = False
    seconds_total: float = 0.0
    seconds_generate: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


def build_user_prompt(prompt: FamilyPrompt, examples: Sequence[dict[str, str]]) -> str:
    """The user text: the family instruction, then the in-context examples as Question/Answer pairs."""
    parts = [prompt.instruction]
    if examples:
        parts.append("Examples of this kind of question:")
        parts += [f"Question: {e['question']}\nAnswer: {e['answer']}" for e in examples]
    parts.append("Now write one new pair for this image.")
    return "\n\n".join(parts)


def pick_examples(pool: Sequence[dict[str, str]], k: int, seed: int) -> list[dict[str, str]]:
    """k reference examples of the subgroup, chosen by the request seed (stable under resume)."""
    if k >= len(pool):
        return list(pool)
    return random.Random(seed).sample(list(pool), k)


def prompt_hash(system: str, user: str) -> str:
    return hashlib.sha256(json.dumps([system, user], ensure_ascii=False).encode("utf-8")).hexdigest()


def plan_requests(rows: pd.DataFrame, images: dict[str, bytes], examples: dict[str, list[dict[str, str]]],
                  cfg: TargetedConfig) -> list[tuple[Any, VLMRequest, list[dict[str, str]], str]]:
    """(row, request, examples, prompt sha256) for every row whose pool image is loaded, in row order."""
    out = []
    for r in rows.itertuples(index=False):
        if r.pool_id not in images:
            continue
        seed = request_seed(cfg.seed, r.gen_id, 0)
        ex = pick_examples(examples.get(r.subgroup, []), cfg.k_shot, seed)
        user = build_user_prompt(cfg.prompts[r.family], ex)
        system = SYSTEM_PROMPT
        out.append((r, VLMRequest(images[r.pool_id], system, user, seed), ex, prompt_hash(system, user)))
    return out


def load_pool_images(rows: pd.DataFrame, pool_shards: dict[str, str]) -> dict[str, bytes]:
    """First image bytes of each row's pool sample, read only from the shards that hold them."""
    urls = sorted({pool_shards[s] for s in rows["pool_shard"] if s in pool_shards})
    want = set(rows["pool_id"])
    got: dict[str, bytes] = {}
    for s in iter_samples(urls, include_ids=want, verify_images=False):
        if s.image_bytes:
            got[s.id] = s.image_bytes[0]
    return got


def _write_atomic_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def ledger_part(out_dir: str | os.PathLike, shard: str) -> Path:
    return step_dir(out_dir, STEP) / f"part-{shard}.parquet"


def generate_shard(shard: str, rows: pd.DataFrame, pool_shards: dict[str, str], out_dir: str | os.PathLike,
                   cfg: TargetedConfig, generator: VLMGenerator | None,
                   examples: dict[str, list[dict[str, str]]]) -> ShardStats:
    """Generate, parse and publish one generation shard (see module doc); skipped when already published.

    :param rows: the retrieved rows of this shard (core/targeted/retrieve.py RETRIEVED_COLUMNS).
    :param pool_shards: pool shard name -> shard URL (where the retrieved images are read from).
    :param generator: the loaded VLM (None is allowed only when the shard is already done).
    :param examples: subgroup -> reference examples (question, answer) the in-context examples come from.
    """
    t0 = time.perf_counter()
    st = ShardStats(shard)
    out = Path(out_dir)
    part = ledger_part(out, shard)
    if part.exists():
        st.skipped = True
        return st
    if generator is None:
        raise ValueError(f"shard {shard} needs generating but no generator was given")
    rows = rows.reset_index(drop=True)
    images = load_pool_images(rows, pool_shards)
    plans = plan_requests(rows, images, examples, cfg)
    t1 = time.perf_counter()
    gens = generator.generate([p[1] for p in plans]) if plans else []
    st.seconds_generate = time.perf_counter() - t1
    if len(gens) != len(plans):
        raise RuntimeError(f"generator returned {len(gens)} answers for {len(plans)} requests")
    recs: list[dict[str, Any]] = []
    accepted: list[Sample] = []
    for (r, req, ex, sha), g in zip(plans, gens):
        p = parse_generation(g.text, g.finish_reason, cfg.prompts[r.family], examples=[e["question"] for e in ex],
                             max_question_words=cfg.max_question_words)
        recs.append({"gen_id": r.gen_id, "pool_id": r.pool_id, "subgroup": r.subgroup, "family": r.family,
                     "seed": req.seed, "prompt_sha256": sha, "examples": json.dumps([e["ref_id"] for e in ex]),
                     "raw": g.text, "finish_reason": g.finish_reason, "n_tokens": g.n_tokens,
                     "reason": "" if p.ok else p.reason,
                     "conversations_json": json.dumps(p.conversations, ensure_ascii=False) if p.ok else ""})
        if p.ok:
            meta = {"targeted": {"subgroup": r.subgroup, "family": r.family, "pool_id": r.pool_id,
                                 "generator": generator.name, "prompt_sha256": sha, "seed": req.seed}}
            rec = {"id": r.gen_id, "image": f"{r.gen_id}.{image_ext(req.image)}", "conversations": p.conversations,
                   "source": f"targeted:{r.subgroup}", "metadata": meta}
            s = Sample.from_record(rec)
            s.image_bytes = [req.image]
            accepted.append(s)
    _write_atomic_parquet(pa.Table.from_pylist(recs, schema=GEN_SCHEMA) if recs else GEN_SCHEMA.empty_table(),
                          out / "targeted" / "generations" / f"part-{shard}.parquet")
    tar = ""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if accepted:
        with ShardWriter(str(out / "shards"), shard, max_samples=len(accepted) + 1,
                         max_bytes=1 << 40) as w:
            for s in accepted:
                tar = w.write(s)
    by_id = {rec["gen_id"]: rec for rec in recs}
    with LedgerWriter(part, STEP) as led:
        for r in rows.itertuples(index=False):
            common = dict(subgroup=r.subgroup, family=r.family, pool_id=r.pool_id, pool_shard=r.pool_shard,
                          ref_id=r.ref_id, similarity=float(r.similarity))
            rec = by_id.get(r.gen_id)
            if rec is None:
                led.add(r.gen_id, "quarantine", "missing_pool_image", None, shard, **common)
                continue
            common.update(generator=generator.name, prompt_sha256=rec["prompt_sha256"], seed=rec["seed"],
                          n_tokens=rec["n_tokens"])
            if rec["reason"]:
                led.add(r.gen_id, "drop", f"gen_rejected:{rec['reason']}", None, shard, raw=rec["raw"][:300], **common)
            else:
                led.add(r.gen_id, "keep", "", None, shard_name(tar), **common)
        reasons = dict(led.reasons)
    st.n, st.n_accepted, st.reasons = len(rows), len(accepted), reasons
    st.seconds_total = time.perf_counter() - t0
    by_code: dict[str, int] = {}
    for k, v in reasons.items():
        by_code[reason_code(k.removeprefix("gen_rejected:"))] = by_code.get(reason_code(k.removeprefix("gen_rejected:")), 0) + v
    log.info("tg_generate %s: %d images, %d accepted, %.1fs generating; rejected: %s", shard, st.n, st.n_accepted,
             st.seconds_generate, by_code)
    return st


# fields that change what is generated (the rest: scheduling and filters)
_OUTPUT_FIELDS = ("model", "backend", "k_shot", "max_new_tokens", "temperature", "top_p", "seed", "batch_size",
                  "shard_size", "max_question_words", "prompts")


def _check_same_config(out: Path, cfg: TargetedConfig) -> None:
    """A resumed run must generate with the config its finished shards were generated with."""
    d = cfg.to_dict()
    want = json.dumps({k: d[k] for k in _OUTPUT_FIELDS}, sort_keys=True, default=str)
    path = out / "targeted" / "generate_config.json"
    if path.exists():
        if path.read_text("utf-8") != want:
            raise ValueError(f"{out} holds shards generated with another config ({path}); use a fresh output "
                             "directory or the same config")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(want, "utf-8")


def generate_shards(retrieved: pd.DataFrame, pool_shards: dict[str, str], out_dir: str | os.PathLike,
                    cfg: TargetedConfig, examples: dict[str, list[dict[str, str]]],
                    shards: Sequence[str] | None = None, generator: VLMGenerator | None = None) -> list[ShardStats]:
    """Run `generate_shard` over the given generation shards (default: all); the model loads once, lazily,
    only if a shard still needs generating."""
    from core.targeted.vlm import make_vlm

    names = list(shards) if shards is not None else sorted(retrieved["gen_shard"].unique())
    _check_same_config(Path(out_dir), cfg)
    stats = []
    for i, name in enumerate(names):
        rows = retrieved[retrieved["gen_shard"] == name]
        if generator is None and not ledger_part(out_dir, name).exists():
            generator = make_vlm(cfg)
        stats.append(generate_shard(name, rows, pool_shards, out_dir, cfg, generator, examples))
        log.info("tg_generate: shard %d/%d %s done", i + 1, len(names), name)
    return stats
