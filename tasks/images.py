"""Container images of the tasks: placeholders bound at package/register time, or ImageSpecs built from code.

Default: `{{.image.<role>.fqn}}` placeholders, bound with `--image <role>=REF` (`make package`/`register`) to the images
`make images` builds from containers/*.Dockerfile. Locally (pyflyte run without --remote) images are ignored, so
packaging needs no Docker.

`MMCURATE_IMAGE_SPEC=1` (set where you package/register or `pyflyte run --remote`): each image is instead the
flytekit `ImageSpec` of containers/image_spec.py (the same pins, from pyproject.toml), which flytekit builds and
pushes to `MMCURATE_IMAGE_REGISTRY`. Inside a running container the variable is unset and the placeholders are used
(a task's image matters only when it is registered).
"""

import os

CPU_IMAGE = "{{.image.cpu.fqn}}:{{.image.cpu.version}}"
GPU_IMAGE = "{{.image.gpu.fqn}}:{{.image.gpu.version}}"
VLLM_IMAGE = "{{.image.vllm.fqn}}:{{.image.vllm.version}}"
TRAIN_IMAGE = "{{.image.train.fqn}}:{{.image.train.version}}"

if os.environ.get("MMCURATE_IMAGE_SPEC", "") not in ("", "0"):
    import importlib.util
    from pathlib import Path

    _path = Path(__file__).resolve().parent.parent / "containers" / "image_spec.py"
    _spec = importlib.util.spec_from_file_location("mmcurate_image_spec", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    CPU_IMAGE, GPU_IMAGE, VLLM_IMAGE, TRAIN_IMAGE = (_module.image_spec(r) for r in ("cpu", "gpu", "vllm", "train"))
