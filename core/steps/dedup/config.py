"""Configuration of the semantic-dedup stage (SemDeDup) and of eval mining / decontamination."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from core.foundation.configs import ConfigJSON, register_preset
from core.runs.fanout import FanOut, tiny_fanout

KEEP_POLICIES = ("hard", "easy", "random")
EMBEDDING_KINDS = ("image", "text", "joint_concat", "joint_mean")
DEVICES = ("cpu", "cuda", "auto")
KMEANS_AUTO = -1  # kmeans_branching value: flat below AUTO_HIERARCHICAL_MIN_CLUSTERS clusters, hierarchical above
AUTO_HIERARCHICAL_MIN_CLUSTERS = 4096  # measured costs and recall: docs/dedup.md "Flat or hierarchical k-means"
AUTO_BRANCHING = 32


@dataclass
class SemDedupConfig(ConfigJSON):
    """SemDeDup settings. Exactly one of `eps` / `target_removal` must be set.

    n_clusters: spherical k-means clusters (the paper uses ~N/10k..N/50; mean cluster size is what matters).
    eps: paper mode, drop sample j when M_j > 1 - eps (M_j = max cosine similarity to an earlier sample
        of its cluster in keep order).
    target_removal: fraction of deduplicated samples to drop, exactly round(target_removal * N); the eps
        that achieves it is reported.
    min_similarity: target mode's floor: a sample is never removed unless M > min_similarity; when fewer
        than the target qualify, only those go and the summary says "asked 10%, found only 3% above the
        floor". None disables it. The presets set it per embedder (docs/dedup.md: how it was chosen).
    keep: which member of a duplicate group survives: `hard` = the one least similar to the centroid
        (paper default), `easy` = the one most similar, `random` = seeded random order.
    kind: embedding used: image, text, joint_concat (concat of the normalized image and text vectors),
        joint_mean (mean of the normalized vectors; needs equal dims).
    kmeans_branching: -1 = auto (default): flat below AUTO_HIERARCHICAL_MIN_CLUSTERS (4096) clusters,
        hierarchical with branching AUTO_BRANCHING (32) at or above (flat costs N*k*d per iteration plus
        k^2*256*d to train, so it is k that makes it superlinear); 0 = flat k-means (the paper's; cost N*k*d per iteration);
        b > 1 = top-down hierarchical spherical k-means with branching b (cost ~N*b*depth*d, near-linear
        in N at a fixed mean cluster size; a duplicate pair split at an upper level is not compared).
    device: torch/faiss device for k-means and the pairwise pass: cpu | cuda | auto.
    chunk_size: block edge of the pairwise pass; peak extra memory is ~chunk_size^2 * 4 bytes.
    cluster_groups: number of balanced cluster groups (units of the pairwise map task).
    max_parallel_groups: concurrency cap of the pairwise map task.
    sweep_subsample / sweep_multipliers: removal-vs-number-of-clusters report on a subsample
        (0 disables); the cluster count is scaled to keep the mean cluster size, times each multiplier.
    """

    n_clusters: int
    eps: Optional[float] = None
    target_removal: Optional[float] = None
    min_similarity: Optional[float] = None
    kmeans_iters: int = 20
    kmeans_branching: int = KMEANS_AUTO
    seed: int = 1234
    keep: str = "hard"
    random_seed: int = 0
    kind: str = "image"
    device: str = "auto"
    chunk_size: int = 4096
    cluster_groups: int = 8
    max_parallel_groups: int = 4
    on_invalid: str = "quarantine"
    sweep_subsample: int = 20_000
    sweep_multipliers: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])

    def __post_init__(self) -> None:
        self.validate()

    @staticmethod
    def _merge_onto(base: dict, data: dict) -> dict:
        """eps and target_removal exclude each other: setting one clears the preset's other."""
        merged = {**base, **data}
        for key, other in (("eps", "target_removal"), ("target_removal", "eps")):
            if data.get(key) is not None and other not in data:
                merged[other] = None
        return merged

    def validate(self) -> None:
        """Raise ValueError on an inconsistent config (called on construction)."""
        if (self.eps is None) == (self.target_removal is None):
            raise ValueError("set exactly one of eps and target_removal")
        if self.eps is not None and not (0.0 <= self.eps < 1.0):
            raise ValueError(f"eps={self.eps} out of range; valid: [0, 1) (a pair is a duplicate when its cosine "
                             "similarity > 1 - eps; eps >= 1 would call unrelated samples duplicates)")
        if self.target_removal is not None and not (0.0 <= self.target_removal <= 1.0):
            raise ValueError(f"target_removal={self.target_removal} out of range; valid: [0, 1]")
        if self.min_similarity is not None and not (-1.0 <= self.min_similarity <= 1.0):
            raise ValueError(f"min_similarity={self.min_similarity} out of range; valid: [-1, 1] (a cosine similarity)")
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters={self.n_clusters} out of range; valid: >= 1")
        if self.keep not in KEEP_POLICIES:
            raise ValueError(f"keep={self.keep!r} not in {KEEP_POLICIES}")
        if self.kind not in EMBEDDING_KINDS:
            raise ValueError(f"kind={self.kind!r} not in {EMBEDDING_KINDS}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} not in {DEVICES}")
        if self.on_invalid not in ("error", "quarantine"):
            raise ValueError("on_invalid must be 'error' or 'quarantine'")
        if self.kmeans_branching < KMEANS_AUTO or self.kmeans_branching == 1:
            raise ValueError("kmeans_branching must be -1 (auto), 0 (flat) or >= 2")
        if self.chunk_size < 1 or self.cluster_groups < 1 or self.max_parallel_groups < 1 or self.kmeans_iters < 1:
            raise ValueError("chunk_size, cluster_groups, max_parallel_groups and kmeans_iters must be >= 1")


@register_preset(SemDedupConfig, "tiny", default=True)  # a partial CLI JSON merges onto the workflows' default
def tiny_dedup_config() -> SemDedupConfig:
    """Demo / test preset: a handful of clusters, 10% removal target, CPU-friendly.

    Floor 0.9982 for the embedded tiny open_clip model as trained by core/steps/embed/tiny_train.py (patch
    dropout 0.65): on the 300-sample demo (scripts/semdedup_floor.py) distinct samples have M median 0.86565,
    p99 0.99717, max 0.99882, planted copies M median 0.99983 (62.5% above 0.99819, the script's floor = the
    99.5th percentile of distinct M); so <1% of distinct samples can go. Re-measure after retraining the
    embedder. (The model trained without patch dropout had 0.9915; the random-weight model needed 0.9999.)"""
    return SemDedupConfig(
        n_clusters=8, target_removal=0.10, min_similarity=0.9982, kmeans_iters=10, chunk_size=512, cluster_groups=2,
        sweep_subsample=2000
    )


@register_preset(SemDedupConfig, "paper")
def semdedup_paper_config(n_clusters: int = 1200) -> SemDedupConfig:
    """Paper eps mode (eps=0.07 lies in the paper's studied range); 1200 clusters ~ 10k samples each at 12M."""
    return SemDedupConfig(n_clusters=n_clusters, eps=0.07, kmeans_iters=100, cluster_groups=64)


@register_preset(SemDedupConfig, "target10")
def target_dedup_config(fraction: float = 0.10, n_clusters: int = 1200) -> SemDedupConfig:
    """Production preset: remove `fraction` of the samples, never one with M <= 0.93 (the paper-mode
    threshold of `semdedup_paper_config`, eps=0.07: pairs less similar than what eps mode would call a
    duplicate are not removed to fill a quota); 1200 clusters ~ 10k samples each at 12M. The floor is not
    measured on SigLIP2 here (no weights offline): measure it with scripts/semdedup_floor.py."""
    return SemDedupConfig(n_clusters=n_clusters, target_removal=fraction, min_similarity=0.93, kmeans_iters=50,
                          cluster_groups=64)


@dataclass
class DecontamConfig(ConfigJSON):
    """Eval mining and decontamination.

    threshold: drop a training sample whose max cosine similarity to any eval item is > threshold.
    k: training neighbours mined per eval item.
    kind: embedding kind (see SemDedupConfig.kind); eval and training embeddings must share it.
    batch_size: training rows per search batch (memory: batch_size x n_eval floats).
    device: cpu | cuda | auto: faiss GPU indexes (faiss-gpu build) when cuda.
    fanout: how the embeddings files spread over workers (core/runs/fanout.py `FanOut`: workers, files per
        group, CPUs/GPUs per worker); the default scores in-process. Each worker scores its files and writes
        their mining parts; the driver merges the parts (a reduce). Where and how fast it runs, never what it
        makes: the step folder's stamp leaves it out.
    """

    threshold: float = 0.95
    k: int = 10
    kind: str = "image"
    batch_size: int = 65_536
    device: str = "auto"
    fanout: FanOut = field(default_factory=tiny_fanout)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and its valid range."""
        if not (-1.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold={self.threshold} out of range; valid: [-1, 1] (a cosine similarity)")
        if self.k < 1 or self.batch_size < 1:
            raise ValueError(f"k={self.k}, batch_size={self.batch_size}: both must be >= 1")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} not in {DEVICES}")
        if self.kind not in EMBEDDING_KINDS:
            raise ValueError(f"kind={self.kind!r} not in {EMBEDDING_KINDS}")


@register_preset(DecontamConfig, "default", default=True)
def default_decontam_config() -> DecontamConfig:
    """Near-duplicate threshold 0.95 on image embeddings, 10 mined neighbours per eval item (SigLIP2-class)."""
    return DecontamConfig()


@register_preset(DecontamConfig, "tiny")
def tiny_decontam_config(**overrides) -> DecontamConfig:
    """For the embedded tiny open_clip model, trained contrastively on demo-generator pairs
    (core/steps/embed/tiny_train.py): 0.98, on SigLIP2's scale. On the demo (benchmarks/demo_embed_quality.py)
    the planted eval copies (exact and JPEG re-encoded) score >= 0.9987 and every other training sample
    <= 0.9659 (a drawn bar chart against a ChartQA fixture chart): 0.98 drops exactly the copies, while
    SigLIP2's 0.95 also drops that chart. 5 neighbours mined."""
    return DecontamConfig(**({"threshold": 0.98, "k": 5} | overrides))
