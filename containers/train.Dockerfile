# mmcurate training image: VLM training as a Kubeflow PyTorchJob (flytekitplugins-kfpytorch, torchrun),
# CUDA torch + transformers + webdataset. Bound to the `train` image placeholder (tasks/images.py).
# Build from the repository root: `make images` (podman; see docs/containers.md), or by hand
#   podman build -f containers/train.Dockerfile -t REGISTRY/mmcurate-train:VERSION .
#   (docker build works too; --build-arg BASE=localhost/mmcurate-base:bookworm where no registry is reachable)
# Installs exactly pyproject.toml's pins (containers/pins.py train) with requirements/lock.txt as constraints.
# The `smoke` stage runs containers/smoke.py train inside the build; the final image copies its report, so an image
# only exists if its smoke step passed.
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE} AS image

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/root \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Triton (torch.compile) compiles a small C launcher at run time: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Pins first, code last: a code change rebuilds only the last layers.
COPY pyproject.toml /build/pyproject.toml
COPY requirements/ /build/requirements/
COPY containers/pins.py /build/containers/pins.py
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3 setuptools==84.2.1 \
    && python /build/containers/pins.py train > /build/requirements.txt \
    && python /build/containers/pins.py train --lock > /build/constraints.txt \
    && pip install --no-cache-dir -r /build/requirements.txt -c /build/constraints.txt \
    && pip check

WORKDIR /root
COPY core/ /root/core/
COPY tasks/ /root/tasks/
COPY workflows/ /root/workflows/

# Smoke: demo data -> ingest -> export -> tiny LM -> a few steps of the mini LLaVA trainer on CPU + checkpoint.
FROM image AS smoke
COPY containers/smoke.py /build/containers/smoke.py
RUN python /build/containers/smoke.py train --report /build/smoke-train.json

FROM image
COPY --from=smoke /build/smoke-train.json /build/smoke-train.json
