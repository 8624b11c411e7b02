"""flytekit `ImageSpec` of each container image, for Flyte setups that build images from code.

The same pins as containers/<role>.Dockerfile: the packages are `containers/pins.py ROLE` (pyproject.toml's pins,
the single source), the apt packages and environment those of the Dockerfile (tests/tasks/test_containers.py checks both).
Selected by `MMCURATE_IMAGE_SPEC=1` at package/register/`pyflyte run --remote` time (tasks/images.py); without it
the tasks carry `{{.image.<role>.fqn}}` placeholders bound with `--image <role>=REF` to the images `make images` builds.

    MMCURATE_IMAGE_SPEC=1 MMCURATE_IMAGE_REGISTRY=ghcr.io/me pyflyte run --remote workflows/curate.py curate ...

Difference from the Dockerfiles: a Dockerfile installs with requirements/lock.txt as pip constraints, so every
transitive version is the locked one; an ImageSpec lists the direct pins and its builder (uv) resolves the rest
within them, and its base image is flytekit's (Python 3.11). `make images` is the reproducible path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pins():
    name = "mmcurate_pins"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "pins.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


# What each Dockerfile adds besides pip (kept equal by tests/tasks/test_containers.py).
APT_PACKAGES = {
    "cpu": [],
    "gpu": ["gcc", "libc6-dev"],
    "train": ["gcc", "libc6-dev"],
    "vllm": ["gcc", "g++", "libc6-dev"],
}
_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
_GPU_ENV = {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
ENV = {
    "cpu": {**_ENV, "OMP_NUM_THREADS": "1"},
    "gpu": {**_ENV, **_GPU_ENV},
    "train": {**_ENV, **_GPU_ENV},
    "vllm": {**_ENV, "VLLM_NO_USAGE_STATS": "1", **_GPU_ENV},
}


def image_spec(role: str, registry: str | None = None):
    """The `flytekit.ImageSpec` of image `role` (cpu, gpu, train, vllm)."""
    from flytekit import ImageSpec

    pins = _pins()
    return ImageSpec(
        name=f"mmcurate-{role}",
        python_version="3.11",
        packages=pins.role_requirements(role),
        apt_packages=APT_PACKAGES[role] or None,
        env=dict(ENV[role]),
        registry=registry if registry is not None else os.environ.get("MMCURATE_IMAGE_REGISTRY", "localhost:30000"),
    )


def image_specs(registry: str | None = None) -> dict:
    """Every role's ImageSpec, by role."""
    return {role: image_spec(role, registry) for role in _pins().ROLES}
