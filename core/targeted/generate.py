"""Generation over shards of retrieved images: prompts with k in-context examples of the subgroup, a VLM,
parsing into LLaVA conversations; resumable by shard like rephrasing.

Layout inside a generation output directory:

    targeted/generations/part-<gen shard>.parquet   every request: ids, prompt hash, raw output, parse result
    shards/<gen shard>-000000.tar                   accepted samples (training schema, image + json): the
                                                    run-directory layout, so the export step reads them
    ledger/tg_generate/part-<gen shard>.parquet     keep (parsed) | drop gen_rejected:<reason> |
                                                    quarantine missing_pool_image, one row per retrieved image

A shard is one unit of `TargetedGenerateStep` (the core/foundation/step.py contract: records and tar published first,
the ledger part last, atomically; a re-run skips shards whose ledger part exists, so a kill loses at most the
shard in flight). Every request's seed and in-context examples derive from (seed, generated id): the output
does not depend on batching, on which shards ran before, or on where a resumed run starts.
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

from core.foundation.ledger import LedgerWriter
from core.foundation.sample import Sample
from core.foundation.step import ShardStep, StepSummary, Unit, write_atomic, write_parquet_atomic
from core.io.images import image_ext
from core.io.wds import ShardWriter, iter_samples, shard_name
from core.steps.rephrase.chunks import request_seed
from core.targeted.config import FamilyPrompt, TargetedConfig
from core.targeted.parse import parse_generation, reason_code
from core.targeted.vlm import VLMGenerator, VLMRequest

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
    """What one unit of `TargetedGenerateStep` did (timings of this call only; the ledger close excluded)."""

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


class TargetedGenerateStep(ShardStep):
    """The generation step on the shared shard-step base: a unit is one generation shard (`gen-NNNNNN`, named
    by retrieval), its generations parquet and tar are published first, its ledger part last.

    :param retrieved: the retrieved rows (core/targeted/retrieve.py RETRIEVED_COLUMNS) of every unit.
    :param pool_shards: pool shard name -> shard URL (where the retrieved images are read from).
    :param examples: subgroup -> reference examples (question, answer) the in-context examples come from.
    :param generator: the VLM; None: built from `cfg` by `setup`, only if a unit still needs generating.
    """

    name = STEP
    stamp_attrs = ()  # its config is compared by _check_same_config (output fields only); the stamp: code

    def __init__(self, out: str | os.PathLike, retrieved: pd.DataFrame, pool_shards: dict[str, str],
                 cfg: TargetedConfig, examples: dict[str, list[dict[str, str]]], generator: VLMGenerator | None = None):
        super().__init__(out)  # no `prev`: every retrieved row gets its decision here (missing images included)
        self.retrieved, self.pool_shards, self.cfg, self.examples = retrieved, pool_shards, cfg, examples
        self.generator = generator

    def unit_name(self, url: str) -> str:
        return url  # the units are generation shard names, not URLs

    def setup(self) -> None:
        from core.targeted.vlm import make_vlm

        if self.generator is None:
            self.generator = make_vlm(self.cfg)

    def run(self, urls: Sequence[str]) -> StepSummary:
        _check_same_config(self.out, self.cfg)
        return super().run(urls)

    def process(self, unit: Unit, led: LedgerWriter) -> ShardStats:
        """Generate, parse and publish one generation shard (see module doc)."""
        t0 = time.perf_counter()
        shard, out, gen = unit.name, self.out, self.generator
        st = ShardStats(shard)
        rows = self.retrieved[self.retrieved["gen_shard"] == shard].reset_index(drop=True)
        plans = plan_requests(rows, load_pool_images(rows, self.pool_shards), self.examples, self.cfg)
        t1 = time.perf_counter()
        gens = gen.generate([p[1] for p in plans]) if plans else []
        st.seconds_generate = time.perf_counter() - t1
        if len(gens) != len(plans):
            raise RuntimeError(f"generator returned {len(gens)} answers for {len(plans)} requests")
        recs, accepted = parse_outputs(plans, gens, self.cfg, gen.name)
        write_parquet_atomic(pa.Table.from_pylist(recs, schema=GEN_SCHEMA) if recs else GEN_SCHEMA.empty_table(),
                             out / "targeted" / "generations" / f"part-{shard}.parquet")
        tar = ""
        (out / "shards").mkdir(parents=True, exist_ok=True)
        if accepted:  # ShardWriter publishes the tar atomically too
            with ShardWriter(str(out / "shards"), shard, max_samples=len(accepted) + 1, max_bytes=1 << 40) as w:
                for s in accepted:
                    tar = w.write(s)
        decide(led, rows, recs, shard, shard_name(tar), gen.name)
        st.n, st.n_accepted, st.reasons = len(rows), len(accepted), dict(led.reasons)
        st.seconds_total = time.perf_counter() - t0
        by_code: dict[str, int] = {}
        for k, v in st.reasons.items():
            code = reason_code(k.removeprefix("gen_rejected:"))
            by_code[code] = by_code.get(code, 0) + v
        log.info("tg_generate %s: %d images, %d accepted, %.1fs generating; rejected: %s", shard, st.n, st.n_accepted,
                 st.seconds_generate, by_code)
        return st


def parse_outputs(plans: Sequence[tuple[Any, VLMRequest, list[dict[str, str]], str]], gens: Sequence[Any],
                  cfg: TargetedConfig, generator: str) -> tuple[list[dict[str, Any]], list[Sample]]:
    """(a GEN_SCHEMA record per request, the accepted samples in training schema with their image) of one shard."""
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
                                 "generator": generator, "prompt_sha256": sha, "seed": req.seed}}
            rec = {"id": r.gen_id, "image": f"{r.gen_id}.{image_ext(req.image)}", "conversations": p.conversations,
                   "source": f"targeted:{r.subgroup}", "metadata": meta}
            s = Sample.from_record(rec)
            s.image_bytes = [req.image]
            accepted.append(s)
    return recs, accepted


def decide(led: LedgerWriter, rows: pd.DataFrame, recs: Sequence[dict[str, Any]], shard: str, tar_shard: str,
           generator: str) -> None:
    """One ledger row per retrieved row: keep (in `tar_shard`), drop gen_rejected:<reason>, or quarantine
    missing_pool_image (its image was not found, so no request was made)."""
    by_id = {rec["gen_id"]: rec for rec in recs}
    for r in rows.itertuples(index=False):
        common = dict(subgroup=r.subgroup, family=r.family, pool_id=r.pool_id, pool_shard=r.pool_shard,
                      ref_id=r.ref_id, similarity=float(r.similarity))
        rec = by_id.get(r.gen_id)
        if rec is None:
            led.add(r.gen_id, "quarantine", "missing_pool_image", None, shard, **common)
            continue
        common.update(generator=generator, prompt_sha256=rec["prompt_sha256"], seed=rec["seed"],
                      n_tokens=rec["n_tokens"])
        if rec["reason"]:
            led.add(r.gen_id, "drop", f"gen_rejected:{rec['reason']}", None, shard, raw=rec["raw"][:300], **common)
        else:
            led.add(r.gen_id, "keep", "", None, tar_shard, **common)


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
    write_atomic(path, want)


def generate_shards(retrieved: pd.DataFrame, pool_shards: dict[str, str], out_dir: str | os.PathLike,
                    cfg: TargetedConfig, examples: dict[str, list[dict[str, str]]],
                    shards: Sequence[str] | None = None, generator: VLMGenerator | None = None) -> list[ShardStats]:
    """Run `TargetedGenerateStep` over the given generation shards (default: all); the model loads once, lazily,
    only if a shard still needs generating. One `ShardStats` per shard (`skipped` for finished ones)."""
    names = list(shards) if shards is not None else sorted(retrieved["gen_shard"].unique())
    done = TargetedGenerateStep(out_dir, retrieved, pool_shards, cfg, examples, generator).run(names).results
    return [done.get(n) or ShardStats(n, skipped=True) for n in names]
