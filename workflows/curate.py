"""The `curate` workflow: ingest -> (embed -> semdedup -> perplexity -> rephrase) -> export."""

from flytekit import workflow
from flytekit.types.directory import FlyteDirectory

from tasks.ingest import ingest_dataset


@workflow
def curate(source: str, image_root: str, shard_max_samples: int = 1000) -> FlyteDirectory:
    """Curate a LLaVA-style dataset.

    :param source: JSON/JSONL dataset path or URL.
    :param image_root: Image folder path or URL.
    :param shard_max_samples: Samples per WDS shard.
    """
    return ingest_dataset(source=source, image_root=image_root, shard_max_samples=shard_max_samples)
