"""`CurateConfig` and `AblateConfig`: what the `curate` and `ablate` workflows run, each one nested config that
crosses the Flyte boundary whole.

Step switches plus each step's own config dataclass; the data paths (source, image root, eval cache, output
folder, ...) and ablate's variants and benchmarks stay workflow inputs. On the command line `--config '{...}'` is a partial JSON merged onto the
default preset (`demo`, `tiny`) by the one override rule of core/foundation/configs.py: `{"decontam": true, "embed_config": "siglip2",
"semdedup_config": {"target_removal": 0.2}}` (a nested config takes a dict merged onto it, or a preset name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.foundation.configs import ConfigJSON, check_ranges, preset, register_preset
from core.io.ingest import IngestOptions, default_ingest_options
from core.runs.fanout import cpu_node_fanout, gpu_cluster_fanout
from core.steps.dedup.config import (
    DecontamConfig,
    SemDedupConfig,
    target_dedup_config,
    tiny_decontam_config,
    tiny_dedup_config,
)
from core.steps.embed.config import EmbedConfig, siglip2_embed_config, tiny_embed_config
from core.steps.export import ExportConfig, default_export_config
from core.steps.filters.image_filter import ImageFilterConfig, qwen2vl_image_filter_config
from core.steps.perplexity.config import PerplexityConfig, reference_perplexity_config
from core.steps.perplexity.slices import SliceConfig, p90_slice_config
from core.steps.rephrase.config import RephraseConfig, tiny_rephrase_config
from core.train.config import TrainConfig, default_train_config

# The benchmarks decontamination checks by default (core/evals knows how to load each).
BENCHMARKS = ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"]


@dataclass
class CurateConfig(ConfigJSON):
    """Step switches and per-step configs of `curate` (ingest, embed and export always run).

    :param ingest_config: IngestOptions (core/io/ingest.py): samples and bytes per ingested shard (the unit of every
        later step's fan-out and resume), the bounds at the door, the image readers.
    :param image_filter: Drop samples with an image too small or too elongated to train on (`image_too_small`,
        `image_aspect_ratio`), before embedding spends anything on them.
    :param image_filter_config: Its thresholds (presets `qwen2vl` (default), `datacomp`, `cc3m`).
    :param embed_config: Embedding model and Ray actors (`tiny` preset: the embedded CPU model, and the run is a
        CPU run: every step gets the CPU profile; `siglip2`: production, a GPU run; core/runs/steps.py).
    :param decontam: Drop training samples that are near-copies of eval items (embedded with the same model),
        reason `eval_contamination:<benchmark>`; needs the workflow's `eval_cache`.
    :param decontam_benchmarks: Benchmarks to decontaminate against.
    :param decontam_config: Similarity threshold, mined neighbours per eval item, embedding kind.
    :param semdedup: Run SemDeDup on the embeddings.
    :param semdedup_config: SemDeDup (target_removal or eps, n_clusters, keep policy, embedding kind).
    :param perplexity: Score conversations with a reference LM and drop by perplexity percentile.
    :param lm_steps: Training steps of the embedded reference LM.
    :param perplexity_config: Perplexity scoring (mode `assistant_only` or `text`, device, batch budget, ...).
    :param ppl_filter_config: The percentile range kept (range mode: `low_pct`, `high_pct`).
    :param rephrase: Rephrase question/answer turns with an LLM (validated; rejected ones keep the original).
    :param rephrase_config: Rephrasing LLM and validation (`tiny` preset: embedded CPU model; `qwen`: vLLM).
    :param export_config: ExportConfig (core/steps/export.py): samples and bytes per exported shard, image format.
    """

    ingest_config: IngestOptions = field(default_factory=default_ingest_options)
    image_filter: bool = False
    image_filter_config: ImageFilterConfig = field(default_factory=qwen2vl_image_filter_config)
    embed_config: EmbedConfig = field(default_factory=tiny_embed_config)
    decontam: bool = False
    decontam_benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARKS))
    decontam_config: DecontamConfig = field(default_factory=tiny_decontam_config)
    semdedup: bool = True
    semdedup_config: SemDedupConfig = field(default_factory=tiny_dedup_config)
    perplexity: bool = True
    lm_steps: int = 300
    perplexity_config: PerplexityConfig = field(default_factory=reference_perplexity_config)
    ppl_filter_config: SliceConfig = field(default_factory=p90_slice_config)
    rephrase: bool = False
    rephrase_config: RephraseConfig = field(default_factory=tiny_rephrase_config)
    export_config: ExportConfig = field(default_factory=default_export_config)

    def __post_init__(self) -> None:
        check_ranges(self, {"lm_steps": (1, None)})
        if self.ppl_filter_config.mode != "range":
            raise ValueError(f"ppl_filter_config.mode={self.ppl_filter_config.mode!r}; curate keeps a percentile range "
                             "(mode 'range'); perplexity slices are the perplexity_slices workflow's")

# the names before every step had one name (ledger = switch = config field prefix = launcher): still read
# (a plain class attribute, not a field: load_config maps them with a warning)
CurateConfig._renamed = {"decontaminate": "decontam", "dedup_config": "semdedup_config",
                         "ppl_config": "perplexity_config", "shard_max_samples": "ingest_config.shard_max_samples",
                         "export_max_samples": "export_config.max_samples"}


@register_preset(CurateConfig, "demo", default=True)
def demo_curate_config() -> CurateConfig:
    """The embedded CPU models on every step (demo, tests): SemDeDup and perplexity on, decontam and rephrase off."""
    return CurateConfig()


@register_preset(CurateConfig, "mammoth_v1")
def mammoth_v1_curate_config() -> CurateConfig:
    """Production MAmmoTH-VL curation (sized for 12M samples on 32 nodes x 8 H100, docs/scale.md): SigLIP2
    embeddings on 32 GPU Ray workers, SemDeDup removing exactly 10% over 1200
    clusters, decontamination at the SigLIP2 threshold 0.95 (switch on with decontam + eval_cache), perplexity
    drop above p90 scored over the cluster (256 Ray actors, one model and GPU each, on 32 worker pods: the step folder
    must be on a filesystem the pods share, `MMCURATE_RESUME_ROOT`), 5000-sample ingest and export shards, ingest and
    export partitioned over 32 one-core actors of one pod each."""
    # partitioned ingest: partitions of 5,000 records (2,400 at 12M) over 32 one-core actors in one pod
    return CurateConfig(ingest_config=IngestOptions(shard_max_samples=5000, partition_records=5000,
                                                    fanout=cpu_node_fanout()),
                        embed_config=siglip2_embed_config(num_actors=32),
                        perplexity_config=preset(PerplexityConfig, "reference", fanout=gpu_cluster_fanout()),
                        semdedup_config=target_dedup_config(0.10, n_clusters=1200),
                        decontam_config=preset(DecontamConfig, "default"),
                        # partitioned export: units of 8 input shards (300 at 12M) over 32 one-core actors in one pod
                        export_config=ExportConfig(max_samples=5000, partition_shards=8, fanout=cpu_node_fanout()))


@dataclass
class AblateConfig(ConfigJSON):
    """The shared steps and the per-variant training/eval recipe of `ablate` (variants and benchmarks are inputs).

    :param ingest_config: IngestOptions (core/io/ingest.py): samples per ingested shard, the bounds at the door.
    :param embed_config: Embedding model (`tiny`: the embedded CPU model, a CPU run: every step gets the CPU profile).
    :param semdedup_config: SemDeDup config used to compute M (the variants' targets then threshold M).
    :param decontam_config: Decontamination threshold and mined neighbours per eval item (decontam, mined).
    :param lm_steps: Training steps of the embedded reference LM.
    :param train_config: The training recipe of every variant (TrainConfig: epochs = one checkpoint per epoch,
        max_steps None = no cap, batch_size, lr, ...); the paths are filled by the training task.
    :param eval_max_samples: Per-benchmark sample cap (0 = all).
    :param baseline_seeds: How many times the baseline is trained (seeds `train_config.seed`, +1, ...): the
        seed-to-seed spread is the noise floor every variant's delta is read against (1 = no noise floor).
    """

    ingest_config: IngestOptions = field(default_factory=default_ingest_options)
    embed_config: EmbedConfig = field(default_factory=tiny_embed_config)
    semdedup_config: SemDedupConfig = field(default_factory=tiny_dedup_config)
    decontam_config: DecontamConfig = field(default_factory=tiny_decontam_config)
    lm_steps: int = 300
    train_config: TrainConfig = field(default_factory=default_train_config)
    eval_max_samples: int = 0
    baseline_seeds: int = 1

    def __post_init__(self) -> None:
        check_ranges(self, {"lm_steps": (1, None), "eval_max_samples": (0, None), "baseline_seeds": (1, None)})


AblateConfig._renamed = {"dedup_config": "semdedup_config", "shard_max_samples": "ingest_config.shard_max_samples"}


@register_preset(AblateConfig, "tiny", default=True)
def tiny_ablate_config() -> AblateConfig:
    """The embedded CPU models on every step (the demo layout, tests), one epoch per variant, no caps; the
    baseline trained with 2 seeds, so the comparison has a noise floor; validation every 10 steps, so a short
    run still logs the held-out loss the comparison reads."""
    return AblateConfig(baseline_seeds=2, train_config=preset(TrainConfig, "default", val_every_n_steps=10))
