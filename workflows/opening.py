"""The opening every curation run shares: ingest the source (cached by its fingerprint) -> embed what ingest kept.

One sub-workflow used by `curate` and `ablate`; built twice from one wiring: `ingest_embed` (GPU Ray embedder) and
`ingest_embed_cpu` (its CPU twin for the tiny embed preset)."""

from typing import NamedTuple

from flytekit.types.directory import FlyteDirectory

from core.steps.embed.config import EmbedConfig
from tasks.embed import embed_shards, embed_shards_cpu
from tasks.ingest import fingerprint_source, ingest_dataset
from tasks.resources import on_cpu
from workflows import named_workflow


class Opening(NamedTuple):
    run: FlyteDirectory
    embeddings: FlyteDirectory


def _ingest_embed_wf(name: str, embed_task):
    def ingest_embed(
        source: str,
        image_root: str,
        embed_config: EmbedConfig,
        shard_max_samples: int = 1000,
        format: str = "auto",
    ) -> Opening:
        """Ingest a dataset into WDS shards, then embed the samples ingest kept.

        :param source: Dataset (JSON/JSONL/WDS/Parquet; file, folder or glob; path or URL).
        :param image_root: Folder the records' image names are relative to.
        :param embed_config: EmbedConfig of the embed step.
        :param shard_max_samples: Samples per ingested shard.
        :param format: Input format spec (docs/ingest.md).
        :return: run (ingest output: shards/ + ledger/ingest) and embeddings (embed/ + ledger/embed).
        """
        # the fingerprint (sizes, mtimes) joins the cache key: a re-run after the files changed re-ingests
        run = ingest_dataset(source=source, image_root=image_root, shard_max_samples=shard_max_samples,
                             source_fingerprint=fingerprint_source(source=source, image_root=image_root), format=format)
        emb = embed_task(shards=run, prev=run, prev_step="ingest", config=embed_config)
        return Opening(run=run, embeddings=emb)

    return named_workflow(ingest_embed, name)


ingest_embed = _ingest_embed_wf("ingest_embed", embed_shards)
ingest_embed_cpu = _ingest_embed_wf("ingest_embed_cpu", embed_shards_cpu)


def opening_for(embed_config: EmbedConfig):
    """The opening sub-workflow for a run's embed config (called at @dynamic run time with a concrete config)."""
    return ingest_embed_cpu if on_cpu(embed_config) else ingest_embed
