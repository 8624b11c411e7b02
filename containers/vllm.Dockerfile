# mmcurate vLLM image: LLM rephrasing (and eval inference) with vLLM. Bound to the `vllm` image placeholder.
# Build from the repository root: `make images` (podman; see docs/containers.md), or by hand
#   podman build -f containers/vllm.Dockerfile -t REGISTRY/mmcurate-vllm:VERSION .
#   (docker build works too; --build-arg BASE=localhost/mmcurate-base:bookworm where no registry is reachable)
# vLLM pins its own torch (vllm 0.32.0: torch 2.13.0, torchvision 0.28.0, transformers <5.20, numpy <2.4 via
# mistral-common), so this image does NOT take our torch stack: containers/pins.py vllm = pyproject's pins
# minus torch/torchvision/transformers/open_clip/faiss/numpy, plus the [vllm] extra; transitive versions come
# from requirements/lock-vllm.txt (pip's resolution of exactly this set on PyPI, `make lock-vllm`).
# The `smoke` stage runs containers/smoke.py vllm inside the build; the final image copies its report, so an image
# only exists if its smoke step passed.
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE} AS image

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/root \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Triton and FlashInfer compile kernels at run time: they need a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Pins first, code last: a code change rebuilds only the last layers.
COPY pyproject.toml /build/pyproject.toml
COPY requirements/ /build/requirements/
COPY containers/pins.py /build/containers/pins.py
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3 setuptools==84.2.1 \
    && python /build/containers/pins.py vllm > /build/requirements.txt \
    && python /build/containers/pins.py vllm --lock > /build/constraints.txt \
    && pip install --no-cache-dir -r /build/requirements.txt -c /build/constraints.txt \
    && pip check \
    && python -c "import vllm, flytekit"

WORKDIR /root
COPY core/ /root/core/
COPY tasks/ /root/tasks/
COPY workflows/ /root/workflows/

# Smoke: pins checked, vllm + the rephrase/eval task modules imported (no GPU in a build: no engine started).
FROM image AS smoke
COPY containers/smoke.py /build/containers/smoke.py
RUN python /build/containers/smoke.py vllm --report /build/smoke-vllm.json

FROM image
COPY --from=smoke /build/smoke-vllm.json /build/smoke-vllm.json
