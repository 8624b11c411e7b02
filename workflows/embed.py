"""The `embedding` workflow: one embed step on ingested shards, with a launch plan per EmbedConfig preset.

The embed node gets the Ray cluster and profile its config asks for (`tasks.embed.embed_overrides`): GPU workers
for the production presets, none for `tiny`; one workflow serves both."""

from typing import Optional

from flytekit import LaunchPlan, dynamic, workflow
from flytekit.types.directory import FlyteDirectory

from core.foundation.configs import preset
from core.steps.embed.config import EmbedConfig
from tasks.embed import embed_node
from tasks.images import CPU_IMAGE
from tasks.types import StepOut, step_out


@dynamic(container_image=CPU_IMAGE)
def embed_run(shards: FlyteDirectory, config: EmbedConfig, prev: Optional[StepOut] = None,
              out_url: Optional[str] = None) -> StepOut:
    """The embed node with the config's Ray cluster and profile (see `embedding`)."""
    return embed_node(config, shards=shards, prev=prev, out_url=out_url)


@workflow
def embedding(
    shards: FlyteDirectory,
    config: EmbedConfig = preset(EmbedConfig, "tiny"),
    prev_step: str = "ingest",
    out_url: Optional[str] = None,
) -> StepOut:
    """Embed images and conversation text of WDS shards (see tasks.embed.embed_shards).

    :param shards: A run folder holding `shards/` and `ledger/<prev_step>/` (e.g. an ingest output).
    :param config: EmbedConfig (default: the tiny preset); on the CLI a JSON merged onto the tiny preset
        (`{"preset": "siglip2", "cache_dir": "/models"}` starts from the production one).
    :param prev_step: The step whose ledger in `shards` selects the ids to embed (its kept/modified ones).
    :param out_url: Persistent folder to write into and resume from.
    """
    prev = step_out(dir=shards, step=prev_step)
    return embed_run(shards=shards, config=config, prev=prev, out_url=out_url)


embedding_tiny = LaunchPlan.get_or_create(embedding, name="embedding_tiny",
                                          default_inputs={"config": preset(EmbedConfig, "tiny")})
embedding_siglip2 = LaunchPlan.get_or_create(embedding, name="embedding_siglip2",
                                             default_inputs={"config": preset(EmbedConfig, "siglip2")})
