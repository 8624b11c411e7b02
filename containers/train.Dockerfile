# mmcurate training image: VLM training as a Kubeflow PyTorchJob (flytekitplugins-kfpytorch, torchrun),
# CUDA torch + transformers + webdataset. Bound to the `train` image placeholder (tasks/images.py).
# Build from the repository root (needs a Docker daemon; not buildable in the dev sandbox):
#   docker build -f containers/train.Dockerfile -t REGISTRY/mmcurate-train:VERSION .
# Installs exactly pyproject.toml's pins (containers/pins.py train) with requirements/lock.txt as constraints.
FROM python:3.11.7-slim-bookworm

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
