"""The curation pipeline declared once, as data: the ordered step table and the resource profile rule.

`CURATE_STEPS` is the one place the order of `curate` is written. Each `Step` carries the one name the step has
everywhere (its ledger folder `ledger/<name>/`, its switch in `CurateConfig`, its launcher in
workflows/steps.py, its deck page `decks/<name>.html`), the `CurateConfig` field holding its config, and whether
it may use a GPU. `workflows/curate.py` loops over this table; the run summary, the docs' step list and the
tests read it instead of repeating the order.

Resources are profiles, not twin tasks: `profile(kind, config, run_gpu)` is the one rule that says what a step's
task requests on a given run (flytesnacks' `customizing_resources.py`, NeMo Curator's per-stage `resources`):

- a step config that names its device decides: `num_gpus > 0` (Ray actors) or `device` starting with `cuda`
  means the GPU profile; `num_gpus == 0` or `device == "cpu"` means the CPU profile;
- `device == "auto"` (or no device field) follows the run: the GPU profile on a GPU run, the CPU one otherwise;
- a run is a GPU run when its embed config puts its actors on GPUs (`run_uses_gpu`): the tiny presets are CPU
  runs end to end, the production presets GPU runs.

The workflows apply the profile with `.with_overrides(**resources.overrides(...))` (tasks/resources.py) inside
their `@dynamic` bodies, so a compiled run states exactly what it requests; the package test checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Step:
    """One row of the step table.

    :param name: The step's one name: ledger folder, switch, launcher, deck page.
    :param switch: The `CurateConfig` bool that turns it on (None: it always runs).
    :param config: The `CurateConfig` field holding its config (None: it has none of its own).
    :param per_shard: Its work splits by shard (it fans out and resumes shard by shard).
    :param gpu: It can use a GPU (it gets the GPU profile on a GPU run).
    :param doc: One line for the docs and the run report.
    """

    name: str
    switch: str | None
    config: str | None
    per_shard: bool
    gpu: bool
    doc: str


CURATE_STEPS: tuple[Step, ...] = (
    Step("ingest", None, "ingest_config", True, False, "read the source into WDS shards; quarantine what cannot be read"),
    Step("image_filter", "image_filter", "image_filter_config", True, False,
         "drop images too small or too elongated to train on"),
    Step("embed", None, "embed_config", True, True, "image and text embeddings (SigLIP2 in production)"),
    Step("decontam", "decontam", "decontam_config", True, True, "drop near-copies of eval items"),
    Step("semdedup", "semdedup", "semdedup_config", False, True, "SemDeDup: drop semantic near-duplicates"),
    Step("perplexity", "perplexity", "perplexity_config", True, True, "score conversations with a reference LM"),
    Step("ppl_filter", "perplexity", "ppl_filter_config", False, False, "keep a perplexity percentile range"),
    Step("rephrase", "rephrase", "rephrase_config", True, True, "rephrase turns with an LLM, validated"),
    Step("export", None, "export_config", True, False, "WebDataset shards in the training schema + dataset card"),
)
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in CURATE_STEPS)
BY_NAME: dict[str, Step] = {s.name: s for s in CURATE_STEPS}


def active_steps(config: Any) -> list[Step]:
    """The steps a `CurateConfig` runs, in order: those without a switch and those whose switch is on."""
    return [s for s in CURATE_STEPS if s.switch is None or getattr(config, s.switch)]


def step_config(step: Step, config: Any) -> Any:
    """The step's own config inside a run config (None when it has none)."""
    return getattr(config, step.config) if step.config else None


# ---- resource profiles ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """What one task of a step requests: CPUs, memory, GPUs and the image role (cpu | gpu | vllm | train)."""

    cpu: str
    mem: str
    gpu: int = 0
    image: str = "cpu"


# The GPU profile of every task kind that can use a GPU (production sizes; a kind is a task, a step may have
# several: SemDeDup clusters, then prunes cluster groups). The CPU profile of a kind is TINY on the same image.
GPU_PROFILES: dict[str, Profile] = {
    "embed": Profile("2", "8Gi", 0, "gpu"),  # the Ray driver; its GPUs are on the Ray workers (ray_job_config)
    "cluster": Profile("8", "64Gi", 1, "gpu"),
    "prune": Profile("4", "32Gi", 1, "gpu"),
    "ingest": Profile("2", "4Gi", 0, "cpu"),  # CPU only; per actor of a partitioned ingest's fan-out
    "decontam": Profile("8", "32Gi", 0, "gpu"),  # a streamed faiss pass: CPU-bound, no GPU requested
    "perplexity": Profile("8", "32Gi", 1, "gpu"),
    "rephrase": Profile("8", "32Gi", 1, "vllm"),
    "train": Profile("8", "64Gi", 1, "train"),
    "evaluate": Profile("8", "64Gi", 1, "vllm"),
    "generate": Profile("8", "48Gi", 1, "vllm"),
    "tg_filter": Profile("4", "16Gi", 0, "cpu"),  # targeted generation's filters: CPU; per actor of their fan-out
    "expert": Profile("8", "64Gi", 1, "train"),
    "soup": Profile("8", "64Gi", 1, "vllm"),
}
# What a tiny preset's step needs: the embedded models run on two CPU cores.
TINY = Profile("2", "8Gi", 0)


def config_device(config: Any) -> str:
    """`gpu`, `cpu` or `auto`: what a step config says about its device."""
    if config is None:
        return "auto"
    gpus = getattr(config, "num_gpus", None)
    if gpus is not None:
        return "gpu" if gpus > 0 else "cpu"
    device = str(getattr(config, "device", "auto") or "auto")
    if device.startswith("cuda"):
        return "gpu"
    return "cpu" if device == "cpu" else "auto"


def run_uses_gpu(embed_config: Any) -> bool:
    """A run is a GPU run when its embed config puts the embedding actors on GPUs."""
    return config_device(embed_config) == "gpu"


def uses_gpu(config: Any, run_gpu: bool) -> bool:
    """The one rule: the step config's own device when it names one, else the run's."""
    d = config_device(config)
    return run_gpu if d == "auto" else d == "gpu"


def profile(kind: str, config: Any, run_gpu: bool) -> Profile:
    """The profile of one task kind on a run (the task's own pod): its GPU profile when `uses_gpu`, else TINY on
    the same image. A config that fans out over `workers` Ray actors (`config.fanout`, core/runs/fanout.py):
    in the task's own pod (`pod_workers == 0`) the pod is sized for all of them; on worker pods
    (`pod_workers > 0`) the task's pod is the Ray head, which runs the driver only (`DRIVER`), and
    `worker_pods` sizes the workers."""
    gpu = GPU_PROFILES.get(kind, TINY)
    base = gpu if uses_gpu(config, run_gpu) else replace(TINY, image=gpu.image)
    fan = getattr(config, "fanout", None)
    if fan is None or fan.workers <= 1:
        return base
    if fan.pod_workers:
        return replace(DRIVER, image=base.image)
    return _pod(base, fan, fan.workers)


# The head of a multi-pod fan-out: the driver lists units, holds the folder lock and runs the reduce.
DRIVER = Profile("4", "16Gi", 0)


def worker_pods(kind: str, config: Any, run_gpu: bool) -> tuple[int, Profile] | None:
    """(number of Ray worker pods, each one's profile) of a step config that fans out over worker pods
    (`fanout.pod_workers > 0`); None when its actors run in the task's own pod."""
    fan = getattr(config, "fanout", None)
    if fan is None or fan.workers <= 1 or not fan.pod_workers:
        return None
    gpu = GPU_PROFILES.get(kind, TINY)
    base = gpu if uses_gpu(config, run_gpu) else replace(TINY, image=gpu.image)
    return fan.pods, _pod(base, fan, min(fan.pod_workers, fan.workers))


def _pod(base: Profile, fan: Any, n: int) -> Profile:
    """A pod holding `n` actors of `fan`: CPUs and GPUs per actor times n (+2 CPUs for Ray and the driver),
    memory per actor times n (each actor's memory is the step's single-task profile)."""
    import math

    gpus = math.ceil(n * fan.gpus_per_worker) if base.gpu else 0
    cpus = max(float(base.cpu), n * max(fan.cpus_per_worker, 1.0) + 2)
    mem_gi = int(base.mem.removesuffix("Gi")) * n
    return Profile(f"{cpus:g}", f"{mem_gi}Gi", gpus, base.image)
