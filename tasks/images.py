"""Container image placeholders, bound at package/register time with `--image NAME=ref`.

Locally (pyflyte run without --remote) images are ignored, so packaging needs no Docker.
"""

CPU_IMAGE = "{{.image.cpu.fqn}}:{{.image.cpu.version}}"
GPU_IMAGE = "{{.image.gpu.fqn}}:{{.image.gpu.version}}"
VLLM_IMAGE = "{{.image.vllm.fqn}}:{{.image.vllm.version}}"
TRAIN_IMAGE = "{{.image.train.fqn}}:{{.image.train.version}}"
