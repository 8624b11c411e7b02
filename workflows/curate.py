"""The `curate` workflow: ingest -> embed -> decontam -> semdedup -> perplexity -> rephrase -> export -> summary.

What runs is one nested `CurateConfig` (core/runs/config.py: step switches + each step's config); the data
paths are plain inputs. Every step but ingest/embed/export is switchable; each deterministic task is cached with
a version tied to its code, so a re-run with one changed knob recomputes only that step and what follows it.
"""

from typing import NamedTuple, Optional

from flytekit import LaunchPlan, dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.configs import preset
from core.runs.config import CurateConfig
from tasks.export import export_dataset
from tasks.images import CPU_IMAGE
from tasks.ingest import fingerprint_source, ingest_dataset
from tasks.perplexity import score_perplexity, score_perplexity_cpu, slice_by_perplexity, train_reference_lm
from tasks.rephrase import rephrase_samples, rephrase_samples_cpu
from tasks.resources import on_cpu
from tasks.run_report import summarize_run
from tasks.validate import validate_curate_inputs
from workflows.dedup import decontamination_cpu_wf, decontamination_wf, semdedup_cpu_wf, semdedup_wf
from workflows.opening import opening_for


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
    """The steps of `curate` (see its docstring for the inputs), wired at run time from the switches.

    The tiny embed preset runs every step on its CPU twin (tasks/resources.py); the others on GPU tasks.
    """
    c = config
    cpu = on_cpu(c.embed_config)  # the tiny embed preset: every step but rephrase runs its CPU twin
    run, emb = opening_for(c.embed_config)(source=source, image_root=image_root, embed_config=c.embed_config,
                                           shard_max_samples=c.shard_max_samples, format=format)
    dirs, steps = [run, emb], ["ingest", "embed"]
    prev, prev_step = emb, "embed"
    if c.decontaminate:
        decontam = decontamination_cpu_wf if cpu else decontamination_wf
        dc = decontam(embeddings=emb, eval_cache=eval_cache, benchmarks=c.decontam_benchmarks,
                      embed_config=c.embed_config, config=c.decontam_config, prev=prev, prev_step=prev_step, run=run)
        dirs, steps = dirs + [dc], steps + ["decontam"]
        prev, prev_step = dc, "decontam"
    if c.semdedup:
        dd = (semdedup_cpu_wf if cpu else semdedup_wf)(embeddings=emb, config=c.dedup_config, prev=prev,
                                                       prev_step=prev_step, run=run)
        dirs, steps = dirs + [dd], steps + ["semdedup"]
        prev, prev_step = dd, "semdedup"
    if c.perplexity:
        ref = run
        if reference_source:
            ref = ingest_dataset(source=reference_source, image_root=reference_image_root,
                                 shard_max_samples=c.shard_max_samples,
                                 source_fingerprint=fingerprint_source(source=reference_source,
                                                                       image_root=reference_image_root))
        lm = train_reference_lm(run=ref, reference_ids=reference_ids, steps=c.lm_steps)
        score = score_perplexity_cpu if cpu else score_perplexity
        scores = score(run=run, model=lm, prev=prev, prev_step=prev_step, config=c.ppl_config)
        cut = slice_by_perplexity(scores=scores, config=c.ppl_filter_config)
        dirs, steps = dirs + [scores, cut], steps + ["perplexity", "ppl_filter"]
        prev, prev_step = cut, "ppl_filter"
    rephrased = None
    if c.rephrase:
        rephrase_task = rephrase_samples_cpu if on_cpu(c.rephrase_config) else rephrase_samples
        rephrased = rephrase_task(run_dir=run, config=c.rephrase_config, prev=prev,
                                  prev_step=prev_step).out_dir
        dirs, steps = dirs + [rephrased], steps + ["rephrase"]
    out = export_dataset(run_dir=run, step_dirs=dirs[1:], steps=steps, rephrased=rephrased,
                         max_samples=c.export_max_samples)
    summary = summarize_run(step_dirs=dirs + [out], steps=steps + ["export"], export=out, output_dir=output_dir,
                            known_bad_ids=known_bad_ids, config=c)
    return CurateOutputs(export=out, summary=summary)


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
        JSON merged onto the `demo` preset (embedded CPU models): `{"decontaminate": true, "rephrase": true}`,
        `{"embed_config": "siglip2", "dedup_config": {"target_removal": 0.2}}` (a nested config takes a dict or a
        preset name: embed tiny|siglip2, dedup tiny|paper|target10, rephrase tiny|qwen), or
        `{"preset": "mammoth_v1"}` for the production preset. Bad keys or values stop the CLI with the field and
        its valid range.
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`), needed by decontaminate.
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

    Every input is checked first (validate_curate_inputs, seconds); the steps then run in `curate_steps`.
    The tiny embed preset runs every step on its CPU twin; production presets request GPUs.
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
