"""The one-step workflows of SemDeDup and eval decontamination, for running a step on its own (launch plans,
`pyflyte run`); `curate` and `ablate` wire the same launchers (workflows/steps.py) inside their own runs.

Each is a `@workflow` (a launch plan must target one) around a `@dynamic` that launches the step with the profile
its config and `gpu` input give (core/runs/steps.py): SemDeDup = k-means task -> capped map task over cluster
groups -> decision + deck; decontam = eval sets -> shards -> the same embedder -> decontam task.
"""

from types import SimpleNamespace
from typing import List, Optional

from flytekit import LaunchPlan, dynamic, workflow

from core.steps.dedup.config import DecontamConfig, SemDedupConfig, target_dedup_config, tiny_dedup_config
from core.steps.embed.config import EmbedConfig
from tasks.images import CPU_IMAGE
from tasks.types import StepOut
from workflows.steps import RunNodes, launch_decontam, launch_semdedup, prune_groups  # noqa: F401 (re-export)


@dynamic(container_image=CPU_IMAGE)
def semdedup_run(embeddings: StepOut, config: SemDedupConfig, prev: Optional[StepOut] = None,
                 run: Optional[StepOut] = None, gpu: bool = True) -> StepOut:
    """SemDeDup's nodes with their profile (see `semdedup`)."""
    nodes = RunNodes(config=SimpleNamespace(semdedup_config=config), gpu=gpu,
                     outs={"ingest": run, "embed": embeddings})
    return launch_semdedup(nodes, prev)


@workflow
def semdedup(
    embeddings: StepOut,
    config: SemDedupConfig,
    prev: Optional[StepOut] = None,
    run: Optional[StepOut] = None,
    gpu: bool = True,
) -> StepOut:
    """SemDeDup at scale: returns the step output (semdedup/ artifacts, ledger/semdedup/).

    :param embeddings: The embed step's output (Parquet files of sample_id, image_emb, text_emb).
    :param config: SemDedupConfig (eps or target_removal, n_clusters, keep, kind, device, ...).
    :param prev: The previous step's output; its ledger selects the input ids (None: every embedded sample).
    :param run: Ingest output (shards) for the removed-pair gallery in the deck.
    :param gpu: GPU run (the production profile) or CPU run (tiny presets), unless the config names its device.
    """
    return semdedup_run(embeddings=embeddings, config=config, prev=prev, run=run, gpu=gpu)


@dynamic(container_image=CPU_IMAGE)
def decontam_run(embeddings: StepOut, eval_cache: str, benchmarks: List[str], embed_config: EmbedConfig,
                 config: DecontamConfig, prev: Optional[StepOut] = None, run: Optional[StepOut] = None) -> StepOut:
    """Decontamination's nodes with their profile (see `decontam`)."""
    nodes = RunNodes(config=SimpleNamespace(embed_config=embed_config, decontam_config=config,
                                            decontam_benchmarks=benchmarks),
                     eval_cache=eval_cache, benchmarks=benchmarks, outs={"ingest": run, "embed": embeddings})
    return launch_decontam(nodes, prev)


@workflow
def decontam(
    embeddings: StepOut,
    eval_cache: str,
    benchmarks: List[str],
    embed_config: EmbedConfig,
    config: DecontamConfig,
    prev: Optional[StepOut] = None,
    run: Optional[StepOut] = None,
) -> StepOut:
    """Decontaminate training data against eval sets embedded with the same model: returns the step output
    (mining/<benchmark>.parquet, ledger/decontam/).

    :param embeddings: The training data's embed output.
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`).
    :param benchmarks: Benchmarks to decontaminate against.
    :param embed_config: The EmbedConfig the training data was embedded with (the eval sets get the same; its
        GPUs make this a GPU run).
    :param config: DecontamConfig (threshold, k, kind).
    :param prev: The previous step's output; its ledger selects the input ids (None: every embedded sample).
    :param run: Ingest output of the training data (images for the deck's gallery).
    """
    return decontam_run(embeddings=embeddings, eval_cache=eval_cache, benchmarks=benchmarks,
                        embed_config=embed_config, config=config, prev=prev, run=run)


semdedup_tiny_lp = LaunchPlan.get_or_create(semdedup, name="semdedup_tiny",
                                            default_inputs={"config": tiny_dedup_config(), "gpu": False})
semdedup_target10_lp = LaunchPlan.get_or_create(
    semdedup, name="semdedup_target10", default_inputs={"config": target_dedup_config(0.10), "gpu": True}
)
