"""The `curate` workflow: the step table of core/runs/steps.py, run in order, then the run summary.

What runs is one nested `CurateConfig` (core/runs/config.py: a switch and a config per step); the data paths are
plain inputs. `curate_steps` loops over the table (`active_steps`): each step's launcher (workflows/steps.py)
creates its nodes with the step's resource profile and hands its `StepOut` to the next. Each deterministic
task is cached with a version tied to its code, so a re-run with one changed knob recomputes only that step and
what follows it.
"""

from typing import NamedTuple, Optional

from flytekit import LaunchPlan, dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.configs import preset
from core.runs.config import CurateConfig
from core.runs.steps import active_steps
from tasks.images import CPU_IMAGE
from tasks.run_report import summarize_run
from tasks.validate import validate_curate_inputs
from workflows.steps import RunNodes, launch


class CurateOutputs(NamedTuple):
    export: FlyteDirectory
    summary: FlyteDirectory


@dynamic(container_image=CPU_IMAGE)
def curate_steps(
    source: str,
    image_root: str,
    config: CurateConfig,
    eval_cache: str = "",
    reference_source: str = "",
    reference_image_root: str = "",
    reference_ids: Optional[FlyteFile] = None,
    output_dir: str = "",
    format: str = "auto",
    known_bad_ids: Optional[FlyteFile] = None,
) -> CurateOutputs:
    """The steps of `curate` (see its docstring for the inputs): the active rows of the step table, in order.

    Each step gets its resource profile from its config and the run (core/runs/steps.py `profile`): the tiny
    presets are CPU runs end to end, the production presets request GPUs on the GPU steps.
    """
    run = RunNodes(config=config, source=source, image_root=image_root, format=format, eval_cache=eval_cache,
                   reference_source=reference_source, reference_image_root=reference_image_root,
                   reference_ids=reference_ids)
    export = launch(run, active_steps(config))
    summary = summarize_run(steps=list(run.outs.values()), output_dir=output_dir, known_bad_ids=known_bad_ids, config=config)
    return CurateOutputs(export=export.dir, summary=summary)


@workflow
def curate(
    source: str,
    image_root: str,
    config: CurateConfig = preset(CurateConfig, "demo"),
    eval_cache: str = "",
    reference_source: str = "",
    reference_image_root: str = "",
    reference_ids: Optional[FlyteFile] = None,
    output_dir: str = "",
    format: str = "auto",
    known_bad_ids: Optional[FlyteFile] = None,
) -> CurateOutputs:
    """Curate a LLaVA-style dataset into training-ready WebDataset shards.

    :param source: Dataset: JSON array (.json, streamed), JSONL, WebDataset shards or Parquet; file, folder or
        glob, path or fsspec URL.
    :param image_root: Folder the records' image names are relative to; path or URL.
    :param config: CurateConfig: step switches and per-step configs (core/runs/config.py). On the CLI a partial
        JSON merged onto the `demo` preset (embedded CPU models): `{"decontam": true, "rephrase": true}`,
        `{"embed_config": "siglip2", "semdedup_config": {"target_removal": 0.2}}` (a nested config takes a dict or a
        preset name: embed tiny|siglip2, dedup tiny|paper|target10, rephrase tiny|qwen), or
        `{"preset": "mammoth_v1"}` for the production preset. Bad keys or values stop the CLI with the field and
        its valid range.
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`), needed by decontam.
    :param reference_source: Trusted reference dataset (JSON/JSONL) the reference LM trains on, DFN-style;
        empty: train on the dataset being curated (weaker: the LM also learns its defects).
    :param reference_image_root: Image folder of the reference dataset.
    :param reference_ids: Optional JSON id list (or object with a "clean" list) selecting the trusted samples
        of the reference dataset (default: all of them).
    :param output_dir: Where to publish the curated set and the run summary (path or URL; empty: none).
    :param format: Input format: auto, or a container json|jsonl|wds|parquet and/or dialect llava|messages
        (`jsonl:messages`); see docs/ingest.md.
    :param known_bad_ids: Optional id list (JSON list or one id per line) of samples known to be low quality: the
        run summary reports, per step, how many of them it removed, kept or quarantined.

    Every input is checked first (validate_curate_inputs, seconds); the steps then run in `curate_steps`, in the
    order of the step table (core/runs/steps.py). The tiny embed preset makes a CPU run (every step on two CPUs);
    production presets request GPUs on the GPU steps.
    """
    paths = dict(source=source, image_root=image_root, eval_cache=eval_cache, reference_source=reference_source,
                 reference_image_root=reference_image_root, format=format, known_bad_ids=known_bad_ids)
    checked = validate_curate_inputs(config=config, **paths)
    out = curate_steps(config=config, reference_ids=reference_ids, output_dir=output_dir, **paths)
    checked >> out.export
    return out.export, out.summary


# Named presets as launch plans: the embedded CPU demo, and the production MAmmoTH-VL curation.
curate_demo = LaunchPlan.get_or_create(curate, name="curate_demo", default_inputs={"config": preset(CurateConfig, "demo")})
mammoth_v1_curation = LaunchPlan.get_or_create(curate, name="mammoth_v1_curation",
                                               default_inputs={"config": preset(CurateConfig, "mammoth_v1")})
