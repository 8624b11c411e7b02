"""Rephrase task: shorter human/gpt turns from a local LLM, validated per sample, with a token report."""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Optional

from flytekit import Deck, Resources, current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.steps.rephrase.config import RephraseConfig, tiny_rephrase_config
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import VLLM_IMAGE
from tasks.paths import check_shared, for_actors, resume_key, step_workdir
from tasks.resources import ray_cluster
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut, passing

log = logging.getLogger(__name__)

RephraseOutputs = NamedTuple("RephraseOutputs", [("out", StepOut), ("report", FlyteFile)])


def _tiny_model_for(run_dir: str, work: str) -> str:
    """The embedded default model: the project's tiny LM trained on this run's conversations (CPU demo)."""
    from core.foundation.step import shards_of
    from core.io.wds import iter_samples
    from core.steps.rephrase.tiny_model import train_demo_model

    urls = shards_of(run_dir)
    if not urls:  # a degenerate run (empty source, all quarantined): nothing to rephrase, no model needed
        return ""
    samples = iter_samples(urls, load_images=False, verify_images=False)
    return train_demo_model(samples, os.path.join(work, "tiny_lm"))


# GPU request: this task runs vLLM in the vllm image; the workflows give the tiny preset its CPU profile
# (tasks/resources.py `overrides`); resources never depend on the machine that serializes the task. Cached (seeded generation; the LLM pass is the expensive step): a
# re-run that changes only a later knob (export shard size, ...) reuses the rephrased records.
_REPHRASE_OPTS = dict(container_image=VLLM_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, retries=2, cache=True,
                      cache_version=task_version(__name__))


# A Ray task: one model or vLLM engine per actor (`config.fanout`), in its own pod or, with `fanout.pod_workers`,
# on KubeRay worker pods (the workflows shape the cluster per run: `tasks.resources.fanout_node`).
@task(task_config=ray_cluster("rephrase", tiny_rephrase_config(), True), requests=Resources(cpu="8", mem="32Gi", gpu="1"),
      limits=Resources(gpu="1"), **_REPHRASE_OPTS)
def rephrase_samples(
    run: StepOut,
    config: RephraseConfig = tiny_rephrase_config(),
    model_dir: Optional[FlyteDirectory] = None,
    tokenizer_dir: Optional[FlyteDirectory] = None,
    prev: Optional[StepOut] = None,
    checkpoint_dir: str = "",
) -> RephraseOutputs:
    """Rewrite each human and gpt turn concisely with a local LLM; keep a rephrasing only if it passes
    validation (same turns/roles/<image> placeholders, finished, non-empty, no refusal or preamble, no
    number lost or added, shorter by the margin, meaning kept per MiniLM similarity), else keep the
    original with the reason in the ledger. The deck shows token counts before/after, ratios, reasons
    and before/after examples.

    :param run: The ingest step's output (StepOut "ingest": holds `shards/*.tar`).
    :param config: RephraseConfig: backend, prompts, generation budget, temperature, seed, tensor parallel, the
        validation thresholds (min_shortening, check_numbers, min_similarity), chunk size. Presets `tiny` (the
        embedded tiny LM, transformers on CPU; default) and `qwen` (Qwen2.5-1.5B-Instruct on vLLM).
    :param model_dir: Local chat model directory (HF layout with chat template); sets `config.model`. Without it,
        `config.model` is used; when that is empty too, the transformers backend trains the project's tiny LM
        on this run's text and vLLM fails (nothing is downloaded).
    :param tokenizer_dir: Training tokenizer used for the before/after token counts (default: the model's).
    :param prev: The previous step's output; its ledger selects the input ids (only kept/modified ids are
        rephrased); None: rephrase every sample of the shards.
    :param checkpoint_dir: Persistent local directory to write to and resume from across retries
        (default: this call's step folder under $MMCURATE_RESUME_ROOT, tasks/paths.py `step_workdir`).
    :return: out (StepOut "rephrase") with `ledger/rephrase/`, `rephrase/records/` (sample_id -> new conversations for
        export), `rephrase/report.json|html`; report is the JSON report.
    """
    t0 = step_started("rephrase", backend=config.backend, prev_step=prev.step if prev else "")
    from core.foundation.configs import override
    from core.foundation.step import shards_of
    from core.steps.rephrase.report import report_html, write_report
    from core.steps.rephrase.step import RephraseStep

    selected = passing(prev)  # before any work: a prev without its step's ledger is refused here
    work = current_context().working_directory
    sf = None if checkpoint_dir else step_workdir("rephrase", resume_key(  # default: a persistent step folder
        "rephrase_samples", task_version(__name__), run=run, config=config, model_dir=model_dir,
        tokenizer_dir=tokenizer_dir, prev=prev))
    if sf is not None:
        check_shared(sf, config.fanout)
    out = checkpoint_dir or sf.path
    shards = for_actors(run.dir, config.fanout)  # a URL for actors on other pods
    if model_dir is not None:
        model = for_actors(model_dir, config.fanout)
    elif config.model:
        model = config.model
    elif config.backend == "transformers":
        model = _tiny_model_for(shards, work)
    else:
        raise ValueError(f"backend {config.backend!r} needs model_dir or config.model (a local copy of the model; "
                         "nothing is downloaded)")
    tokenizer = config.tokenizer
    if tokenizer_dir is not None:
        tokenizer = for_actors(tokenizer_dir, config.fanout)
    cfg = override(config, model=model, tokenizer=tokenizer)
    log.info("rephrase: backend=%s model=%s chunk=%d", cfg.backend, cfg.model, cfg.chunk_size)
    from core.runs.fanout import StepSpec, run_fanout

    # one model per Ray actor when cfg.fanout.workers > 1; else the step's own run, in this process
    done = run_fanout(StepSpec(RephraseStep, (out, cfg, selected)), shards_of(shards), cfg.fanout)
    log.info("rephrase: %d shards rephrased, %d already done; %s", len(done.done), len(done.skipped), done.counts)
    jp, _hp, summary = write_report(out, model=cfg.model, tokenizer=cfg.tokenizer_path)
    log.info("rephrase report: %s", summary["verdict"])
    Deck("rephrase", report_html(summary, out))
    save_decks(str(out), "rephrase")
    step_finished("rephrase", t0, str(out))
    return RephraseOutputs(out=StepOut("rephrase", FlyteDirectory(sf.close() if sf else out)), report=FlyteFile(str(jp)))
