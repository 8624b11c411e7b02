"""Perplexity tasks: train the reference LM, score samples, filter or slice by perplexity.

Each task returns a step output directory (`ledger/<step>/part-*.parquet` + the step's artifacts).
"""

from __future__ import annotations

import logging
from typing import Optional

from flytekit import Deck, Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from tasks.cache import task_version
from tasks.decks import save_decks
from tasks.images import CPU_IMAGE, GPU_IMAGE
from tasks.paths import local_ledger_root, source, workdir
from tasks.resources import TINY_REQUESTS, renamed
from tasks.steplog import step_finished, step_started

log = logging.getLogger(__name__)


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), cache=True,
      cache_version=task_version(__name__))
def train_reference_lm(
    run: FlyteDirectory,
    reference_ids: Optional[FlyteFile] = None,
    reference_key: str = "clean",
    steps: int = 300,
    vocab_size: int = 2000,
    seed: int = 0,
) -> FlyteDirectory:
    """Train the embedded default scoring model: a tiny Llama + BPE tokenizer, in seconds on CPU.

    :param run: Ingest output (its `shards/`) holding the reference conversations.
    :param reference_ids: JSON list of trusted ids, or an object with a list under `reference_key`
        (the demo's ground_truth.json); all samples when omitted.
    :param reference_key: Key of the id list inside `reference_ids` when it is an object.
    :param steps: Training steps (batch 8 x 128 tokens).
    :param vocab_size: BPE vocabulary size.
    :param seed: Seed of tokenizer-independent randomness (init, batches): same seed, same weights.
    :return: A model directory loadable with AutoTokenizer / AutoModelForCausalLM.
    """
    t0 = step_started("reference_lm", steps=steps)
    from core.perplexity.reference import load_id_list
    from core.perplexity.reference import train_reference_lm as train
    from core.wds import list_shards

    ids = load_id_list(reference_ids.download(), reference_key) if reference_ids is not None else None
    out = train(list_shards(f"{source(run).rstrip('/')}/shards"), workdir("reference_lm") / "model", ids,
                steps=steps, vocab_size=vocab_size, seed=seed)
    step_finished("reference_lm", t0, trained_on=len(ids) if ids is not None else "all")
    return FlyteDirectory(out)


_SCORE_OPTS = dict(container_image=GPU_IMAGE, retries=1, enable_deck=True, cache=True,
                   cache_version=task_version(__name__))


@task(requests=Resources(cpu="8", mem="32Gi", gpu="1"), **_SCORE_OPTS)
def score_perplexity(
    run: FlyteDirectory,
    model: FlyteDirectory,
    prev: Optional[FlyteDirectory] = None,
    prev_step: str = "",
    preset: str = "tiny",
    mode: str = "assistant_only",
    device: str = "auto",
    dtype: str = "auto",
    batch_tokens: int = 0,
    max_length: int = 0,
    truncation_side: str = "left",
    chat_template: str = "auto",
) -> FlyteDirectory:
    """Score every input sample's perplexity under a causal LM; ledger keep (score = ppl) or quarantine.

    Image placeholders and masked spans never count. Samples with no scored token are quarantined
    (`ppl_no_scored_tokens`). Resumable per shard.

    :param run: Ingest output (its `shards/`).
    :param model: Directory of an HF causal LM + fast tokenizer (train_reference_lm's output or a real model).
    :param prev: Output directory of the previous step; its `ledger/<prev_step>` selects the input ids.
    :param prev_step: Name of the previous step ("" = score every sample of the shards).
    :param preset: Base settings: `tiny` (CPU fp32, 4k-token batches) or `qwen0.5b` (bf16 GPU, 32k-token batches).
    :param mode: `assistant_only` (answers given the preceding turns), `text` (all turns, no images) or `vlm`
        (`model` is then an HF image-text-to-text model whose processor expands `<image>`, LLaVA-style).
    :param device: `auto`, `cpu`, `cuda`.
    :param dtype: `auto` (bf16 on cuda, fp32 on cpu), `float32`, `bfloat16`, `float16`.
    :param batch_tokens: Token budget per batch including padding (0 = preset's).
    :param max_length: Longest scored sequence; longer ones are truncated and flagged (0 = preset's).
    :param truncation_side: `left` keeps the conversation's end, `right` its start.
    :param chat_template: `auto` (model's template, else the plain one), `model` or `plain`.
    :return: `perplexity/scores-<shard>.parquet`, `perplexity/summary.json`, `ledger/perplexity/`.
    """
    t0 = step_started("perplexity", mode=mode, prev_step=prev_step)
    from dataclasses import replace

    from core.perplexity.config import PRESETS
    from core.perplexity.pipeline import score_shards
    from core.perplexity.report import score_report_html
    from core.step import Passing, shards_of

    cfg = PRESETS[preset](model.download(), mode=mode)
    cfg = replace(cfg, device=device, dtype=dtype, truncation_side=truncation_side, chat_template=chat_template,
                  batch_tokens=batch_tokens or cfg.batch_tokens, max_length=max_length or cfg.max_length)
    passing = Passing.read(local_ledger_root(prev, prev_step) if prev is not None and prev_step else None, prev_step)
    out = workdir("perplexity_out")
    summary = score_shards(shards_of(source(run)), out, cfg, prev=passing)
    log.info("perplexity: %s", {k: v for k, v in summary.items() if not isinstance(v, dict)})
    Deck("perplexity", score_report_html(out, summary))
    save_decks(str(out), "perplexity")
    step_finished("perplexity", t0, str(out))
    return FlyteDirectory(str(out))


# CPU twin for the tiny presets (the embedded reference LM scores on CPU).
score_perplexity_cpu = task(requests=TINY_REQUESTS, **_SCORE_OPTS)(renamed(score_perplexity.task_function,
                                                                             "score_perplexity_cpu"))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="8Gi"), enable_deck=True,
      cache=True, cache_version=task_version(__name__))
def slice_by_perplexity(
    scores: FlyteDirectory,
    mode: str = "range",
    low_pct: float = 0.0,
    high_pct: float = 90.0,
    n_slices: int = 10,
    shrink_tokens: float = 10.0,
) -> FlyteDirectory:
    """Keep a perplexity percentile range, or cut the kept samples into equal-size perplexity slices.

    :param scores: score_perplexity's output directory.
    :param mode: `range` (drop outside [low_pct, high_pct]: ppl_above_pXX / ppl_below_pXX) or `slices`.
    :param low_pct: Lowest kept percentile (range mode).
    :param high_pct: Highest kept percentile (range mode).
    :param n_slices: Number of slices (slices mode); slice 00 has the lowest perplexity.
    :param shrink_tokens: Rank by perplexity shrunk toward the corpus mean by this many pseudo-tokens, so
        one-token answers do not swamp the extremes (0 = raw perplexity).
    :return: `ledger/ppl_filter/` and `ppl_filter/` (kept_ids.json, or slice-NN.json + slices.json/.parquet).
    """
    t0 = step_started("ppl_filter", mode=mode, low_pct=low_pct, high_pct=high_pct)
    from core.perplexity.report import slice_report_html
    from core.perplexity.slices import SliceConfig
    from core.perplexity.slices import slice_by_perplexity as run_slices

    out = workdir("ppl_filter_out")
    res = run_slices(local_ledger_root(scores, "perplexity"), out,
                     SliceConfig(mode=mode, low_pct=low_pct, high_pct=high_pct, n_slices=n_slices,
                                 shrink_tokens=shrink_tokens))
    log.info("ppl_filter: %s", {k: v for k, v in res.items() if k != "slices"})
    Deck("ppl_filter", slice_report_html(out, res))
    save_decks(str(out), "ppl_filter")
    step_finished("ppl_filter", t0, str(out))
    return FlyteDirectory(str(out))
