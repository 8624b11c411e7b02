# mmcurate GPU image: embedding on Ray GPU workers (open_clip SigLIP2, CUDA torch, ray) and GPU dedup
# (faiss-gpu instead of faiss-cpu). Bound to the `gpu` image placeholder (tasks/images.py).
# Build from the repository root: `make images` (podman; see docs/containers.md), or by hand
#   podman build -f containers/gpu.Dockerfile -t REGISTRY/mmcurate-gpu:VERSION .
#   (docker build works too; --build-arg BASE=localhost/mmcurate-base:bookworm where no registry is reachable)
# Installs exactly pyproject.toml's pins + the [gpu] extra, without faiss-cpu (containers/pins.py gpu).
# CUDA comes from the torch/faiss wheels (nvidia-* packages); the host supplies only the driver.
# The `smoke` stage runs containers/smoke.py gpu inside the build; the final image copies its report, so an image
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

# Triton (torch.compile, kernels) compiles a small C launcher at run time: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Pins first, code last: a code change rebuilds only the last layers.
COPY pyproject.toml /build/pyproject.toml
COPY requirements/ /build/requirements/
COPY containers/pins.py /build/containers/pins.py
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3 setuptools==84.2.1 \
    && python /build/containers/pins.py gpu > /build/requirements.txt \
    && python /build/containers/pins.py gpu --lock > /build/constraints.txt \
    && pip install --no-cache-dir -r /build/requirements.txt -c /build/constraints.txt \
    && pip check \
    && python -c "import faiss, open_clip, ray, torch; assert hasattr(faiss, 'StandardGpuResources')"

WORKDIR /root
COPY core/ /root/core/
COPY tasks/ /root/tasks/
COPY workflows/ /root/workflows/

# Smoke: demo data -> ingest -> embed (tiny open_clip on CPU) -> SemDedup with faiss k-means (a build has no GPU).
FROM image AS smoke
COPY containers/smoke.py /build/containers/smoke.py
RUN python /build/containers/smoke.py gpu --report /build/smoke-gpu.json

FROM image
COPY --from=smoke /build/smoke-gpu.json /build/smoke-gpu.json
