"""Perplexity tasks: train the reference LM, score samples, filter or slice by perplexity.

Each task returns a step output directory (`ledger/<step>/part-*.parquet` + the step's artifacts).
"""

from __future__ import annotations

import logging
from typing import Optional

from flytekit import Deck, Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.steps.perplexity.config import PerplexityConfig, reference_perplexity_config
from core.steps.perplexity.slices import SliceConfig, p90_slice_config
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import CPU_IMAGE, GPU_IMAGE
from tasks.paths import check_shared, for_actors, local_ledger_root, resume_key, source, step_workdir, workdir
from tasks.resources import ray_cluster
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut, passing

log = logging.getLogger(__name__)


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), cache=True,
      cache_version=task_version(__name__))
def train_reference_lm(
    run: StepOut,
    reference_ids: Optional[FlyteFile] = None,
    reference_key: str = "clean",
    steps: int = 300,
    vocab_size: int = 2000,
    seed: int = 0,
) -> FlyteDirectory:
    """Train the embedded default scoring model: a tiny Llama + BPE tokenizer, in seconds on CPU.

    :param run: Ingest output (StepOut "ingest": its `shards/`) holding the reference conversations.
    :param reference_ids: JSON list of trusted ids, or an object with a list under `reference_key`
        (the demo's ground_truth.json); all samples when omitted.
    :param reference_key: Key of the id list inside `reference_ids` when it is an object.
    :param steps: Training steps (batch 8 x 128 tokens).
    :param vocab_size: BPE vocabulary size.
    :param seed: Seed of tokenizer-independent randomness (init, batches): same seed, same weights.
    :return: A model directory loadable with AutoTokenizer / AutoModelForCausalLM.
    """
    t0 = step_started("reference_lm", steps=steps)
    from core.foundation.step import shards_of
    from core.steps.perplexity.reference import load_id_list
    from core.steps.perplexity.reference import train_reference_lm as train

    ids = load_id_list(reference_ids.download(), reference_key) if reference_ids is not None else None
    out = train(shards_of(source(run.dir)), workdir("reference_lm") / "model", ids,
                steps=steps, vocab_size=vocab_size, seed=seed)
    step_finished("reference_lm", t0, trained_on=len(ids) if ids is not None else "all")
    return FlyteDirectory(out)


_SCORE_OPTS = dict(container_image=GPU_IMAGE, retries=1, enable_deck=True, deck_fields=DECK_FIELDS, cache=True,
                   cache_version=task_version(__name__))


# A Ray task: its actors (`config.fanout`) run in its own pod or, with `fanout.pod_workers`, on KubeRay worker
# pods; the workflows shape the cluster per run (`tasks.resources.fanout_node`). Locally flytekit joins or starts
# a local Ray (`ray.init`), and a 1-worker fan-out runs in the task's process.
@task(task_config=ray_cluster("perplexity", reference_perplexity_config(), True),
      requests=Resources(cpu="8", mem="32Gi", gpu="1"), **_SCORE_OPTS)
def score_perplexity(
    run: StepOut,
    model: FlyteDirectory,
    prev: Optional[StepOut] = None,
    config: PerplexityConfig = reference_perplexity_config(),
) -> StepOut:
    """Score every input sample's perplexity under a causal LM; ledger keep (score = ppl) or quarantine.

    Image placeholders and masked spans never count. Samples with no scored token are quarantined
    (`ppl_no_scored_tokens`). Resumable per shard.

    :param run: Ingest output (StepOut "ingest": its `shards/`).
    :param model: Directory of an HF causal LM + fast tokenizer (train_reference_lm's output or a real model).
    :param prev: The previous step's output (its ledger selects the input ids); None: score every sample.
    :param config: PerplexityConfig (mode `assistant_only` / `text` / `vlm`, device, dtype, batch token budget,
        max length, truncation side, chat template; presets `reference` (default), `tiny`, `qwen0.5b`); its `model` is
        set to `model`.
        `vlm` mode: `model` is an HF image-text-to-text model whose processor expands `<image>`, LLaVA-style.
    :return: StepOut "perplexity": `perplexity/scores-<shard>.parquet`, `perplexity/summary.json`,
        `ledger/perplexity/`.
    """
    t0 = step_started("perplexity", mode=config.mode, prev_step=prev.step if prev else "")
    from core.foundation.configs import override
    from core.foundation.step import shards_of
    from core.steps.perplexity.pipeline import score_shards
    from core.steps.perplexity.report import score_report_html

    cfg = override(config, model=for_actors(model, config.fanout))  # a URL for actors on other pods
    sf = step_workdir("perplexity", resume_key("score_perplexity", task_version(__name__), run=run, model=model,
                                               prev=prev, config=config))  # a retry skips scored shards
    check_shared(sf, config.fanout)
    out = sf.path
    summary = score_shards(shards_of(source(run.dir)), out, cfg, prev=passing(prev))
    log.info("perplexity: %s", {k: v for k, v in summary.items() if not isinstance(v, dict)})
    Deck("perplexity", score_report_html(out, summary))
    save_decks(str(out), "perplexity")
    step_finished("perplexity", t0, sf.url)
    return StepOut("perplexity", FlyteDirectory(sf.close()))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="8Gi"), enable_deck=True, deck_fields=DECK_FIELDS,
      cache=True, cache_version=task_version(__name__))
def slice_by_perplexity(
    scores: StepOut,
    config: SliceConfig = p90_slice_config(),
) -> StepOut:
    """Keep a perplexity percentile range, or cut the kept samples into equal-size perplexity slices.

    :param scores: score_perplexity's output (StepOut "perplexity").
    :param config: SliceConfig: `range` mode (drop outside [low_pct, high_pct]: ppl_above_pXX / ppl_below_pXX) or
        `slices` (n_slices equal-size id lists, slice 00 lowest); shrink_tokens shrinks each perplexity toward the
        corpus mean so one-token answers do not swamp the extremes. Presets `p90` (default), `deciles`.
    :return: StepOut "ppl_filter": `ledger/ppl_filter/` and `ppl_filter/` (kept_ids.json, or slice-NN.json +
        slices.json/.parquet).
    """
    t0 = step_started("ppl_filter", mode=config.mode, low_pct=config.low_pct, high_pct=config.high_pct)
    from core.steps.perplexity.report import slice_report_html
    from core.steps.perplexity.slices import slice_by_perplexity as run_slices

    out = workdir("ppl_filter_out")
    res = run_slices(local_ledger_root(scores.dir, scores.step), out, config)
    log.info("ppl_filter: %s", {k: v for k, v in res.items() if k != "slices"})
    Deck("ppl_filter", slice_report_html(out, res))
    save_decks(str(out), "ppl_filter")
    step_finished("ppl_filter", t0, str(out))
    return StepOut("ppl_filter", FlyteDirectory(str(out)))
