"""The `embedding` workflow: one embed step on ingested shards, with a LaunchPlan per EmbedConfig preset.

`embedding` runs the Ray task with GPU workers (production presets); `embedding_cpu` its CPU twin (tiny)."""

from typing import Optional

from flytekit import LaunchPlan, workflow
from flytekit.types.directory import FlyteDirectory

from tasks.embed import embed_shards, embed_shards_cpu


@workflow
def embedding(
    shards: FlyteDirectory,
    prev: Optional[FlyteDirectory] = None,
    prev_step: str = "ingest",
    preset: str = "tiny",
    cache_dir: Optional[str] = None,
    out_url: Optional[str] = None,
) -> FlyteDirectory:
    """Embed images and conversation text of WDS shards (see tasks.embed.embed_shards).

    :param shards: Folder of `*.tar` shards, or a run folder holding `shards/`.
    :param prev: Folder holding `ledger/<prev_step>/`; only its passing ids are embedded.
    :param prev_step: Step name of the previous step's ledger.
    :param preset: `tiny` (CPU, embedded default) or `siglip2` (GPU production).
    :param cache_dir: Local model cache (Hugging Face cache for hf-hub models).
    :param out_url: Persistent folder to write into and resume from.
    """
    return embed_shards(shards=shards, prev=prev, prev_step=prev_step, preset=preset,
                        cache_dir=cache_dir, out_url=out_url)


@workflow
def embedding_cpu(
    shards: FlyteDirectory,
    prev: Optional[FlyteDirectory] = None,
    prev_step: str = "ingest",
    preset: str = "tiny",
    cache_dir: Optional[str] = None,
    out_url: Optional[str] = None,
) -> FlyteDirectory:
    """Embed on CPU (the tiny preset): the same step as `embedding`, without the GPU Ray cluster.

    :param shards: Folder of `*.tar` shards, or a run folder holding `shards/`.
    :param prev: Folder holding `ledger/<prev_step>/`; only its passing ids are embedded.
    :param prev_step: Step name of the previous step's ledger.
    :param preset: `tiny` (the embedded CPU model).
    :param cache_dir: Local model cache (Hugging Face cache for hf-hub models).
    :param out_url: Persistent folder to write into and resume from.
    """
    return embed_shards_cpu(shards=shards, prev=prev, prev_step=prev_step, preset=preset,
                            cache_dir=cache_dir, out_url=out_url)


embedding_tiny = LaunchPlan.get_or_create(embedding_cpu, name="embedding_tiny", default_inputs={"preset": "tiny"})
embedding_siglip2 = LaunchPlan.get_or_create(embedding, name="embedding_siglip2", default_inputs={"preset": "siglip2"})
