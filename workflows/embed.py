"""The `embedding` workflow: one embed step on ingested shards, with a LaunchPlan per EmbedConfig preset.

`embedding` runs the Ray task with GPU workers (production presets); `embedding_cpu` its CPU twin (tiny); one
wiring builds both."""

from typing import Optional

from flytekit import LaunchPlan
from flytekit.types.directory import FlyteDirectory

from core.foundation.configs import preset
from core.steps.embed.config import EmbedConfig
from tasks.embed import embed_shards, embed_shards_cpu
from workflows import named_workflow


def _embedding_wf(name: str, embed_task):
    """`embedding` (GPU Ray workers) or `embedding_cpu` (the tiny preset, no GPU Ray cluster): one wiring."""

    def embedding(
        shards: FlyteDirectory,
        config: EmbedConfig = preset(EmbedConfig, "tiny"),
        prev: Optional[FlyteDirectory] = None,
        prev_step: str = "ingest",
        out_url: Optional[str] = None,
    ) -> FlyteDirectory:
        """Embed images and conversation text of WDS shards (see tasks.embed.embed_shards).

        :param shards: Folder of `*.tar` shards, or a run folder holding `shards/`.
        :param config: EmbedConfig (default: the tiny preset); on the CLI a JSON merged onto the tiny preset
            (`{"preset": "siglip2", "cache_dir": "/models"}` starts from the production one).
        :param prev: Folder holding `ledger/<prev_step>/`; only its passing ids are embedded.
        :param prev_step: Step name of the previous step's ledger.
        :param out_url: Persistent folder to write into and resume from.
        """
        return embed_task(shards=shards, prev=prev, prev_step=prev_step, config=config, out_url=out_url)

    return named_workflow(embedding, name)


embedding = _embedding_wf("embedding", embed_shards)
embedding_cpu = _embedding_wf("embedding_cpu", embed_shards_cpu)

embedding_tiny = LaunchPlan.get_or_create(embedding_cpu, name="embedding_tiny",
                                          default_inputs={"config": preset(EmbedConfig, "tiny")})
embedding_siglip2 = LaunchPlan.get_or_create(embedding, name="embedding_siglip2",
                                             default_inputs={"config": preset(EmbedConfig, "siglip2")})
