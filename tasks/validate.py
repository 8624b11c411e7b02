"""The first, cheap task of `curate` and `ablate`: every input checked before any heavy task starts.

Paths exist, the source has at least one record (a peek at its first bytes), the eval cache holds the
requested benchmarks, numbers are in range, configs pass their own validation. All problems are reported at
once (core.runs.checks.InputError), each naming the input and what it accepts.
"""

from __future__ import annotations

import logging
from typing import List, Optional

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from core.runs.config import AblateConfig, CurateConfig
from tasks.images import CPU_IMAGE

log = logging.getLogger(__name__)


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def validate_curate_inputs(
    source: str,
    image_root: str,
    config: CurateConfig,
    eval_cache: str = "",
    reference_source: str = "",
    reference_image_root: str = "",
    format: str = "auto",
    known_bad_ids: Optional[FlyteFile] = None,
) -> str:
    """Check the inputs of `curate` (see its docstring); raises InputError listing every bad input.

    The config's own ranges were checked when it was built (a bad `--config` stops the CLI); here: the paths, the
    first record, the known-bad ids, the reference set, and the eval cache when decontam is on.

    :param format: Ingest format spec of `source` (auto, json|jsonl|wds|parquet, llava|messages, container:dialect).
    :param known_bad_ids: Optional id list file; checked to be readable and non-empty.
    :return: A one-line summary of what was checked.
    """
    from core.foundation.log import setup_logging
    from core.runs.checks import Problems, check_benchmarks, check_run_inputs

    setup_logging()
    p = Problems("curate")
    check_run_inputs(p, source=source, image_root=image_root, format=format,
                     known_bad_ids=known_bad_ids.download() if known_bad_ids is not None else None,
                     shard_max_samples=config.ingest_config.shard_max_samples, semdedup_config=config.semdedup_config,
                     decontam_config=config.decontam_config, reference_source=reference_source,
                     reference_image_root=reference_image_root)
    if config.decontam:
        check_benchmarks(p, "decontam_benchmarks", config.decontam_benchmarks, eval_cache)
    p.raise_if_any()
    msg = f"inputs ok: source {source}, image_root {image_root}"
    log.info("validate: %s", msg)
    return msg


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def validate_ablate_inputs(
    source: str,
    image_root: str,
    variants: List[str],
    eval_cache: str,
    config: AblateConfig,
    benchmarks: List[str],
    reference_source: str = "",
    reference_image_root: str = "",
    format: str = "auto",
    known_bad_ids: Optional[FlyteFile] = None,
) -> str:
    """Check the inputs of `ablate` (see its docstring); raises InputError listing every bad input (the config's
    numbers were checked when it was built).

    :param format: Ingest format spec of `source` (auto, json|jsonl|wds|parquet, llava|messages, container:dialect).
    :param known_bad_ids: Optional id list file; checked to be readable and non-empty.
    :return: A one-line summary of what was checked.
    """
    from core.foundation.log import setup_logging
    from core.runs.ablation import parse_variant
    from core.runs.checks import Problems, check_benchmarks, check_run_inputs

    setup_logging()
    p = Problems("ablate")
    check_run_inputs(p, source=source, image_root=image_root, format=format,
                     known_bad_ids=known_bad_ids.download() if known_bad_ids is not None else None,
                     shard_max_samples=config.ingest_config.shard_max_samples, semdedup_config=config.semdedup_config,
                     decontam_config=config.decontam_config, reference_source=reference_source,
                     reference_image_root=reference_image_root)
    p.check(bool(variants), "variants", "needs at least one variant (e.g. baseline)")
    for v in variants:
        try:
            parse_variant(v)
        except ValueError as e:
            p.add("variants", str(e))
    check_benchmarks(p, "benchmarks", benchmarks, eval_cache)
    p.raise_if_any()
    msg = f"inputs ok: {len(variants)} variants, {len(benchmarks)} benchmarks"
    log.info("validate: %s", msg)
    return msg
