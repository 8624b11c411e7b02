# mmcurate CPU image: every CPU task (ingest, dedup, export, reports, eval scoring).
# Bound to the `cpu` image placeholder (tasks/images.py) and to tasks without one (`make package`/`register`).
# Build from the repository root (needs a Docker daemon; not buildable in the dev sandbox):
#   docker build -f containers/cpu.Dockerfile -t REGISTRY/mmcurate-cpu:VERSION .
# Installs exactly pyproject.toml's pins (containers/pins.py cpu) with requirements/lock.txt as constraints:
# the same environment `make setup` builds and `make test` tests (torch is PyPI's CUDA build, used on CPU).
FROM python:3.11.7-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/root \
    OMP_NUM_THREADS=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# flytekit's default in-container interpreter is /opt/venv/bin/python3 (pyflyte package/register).
COPY pyproject.toml /build/pyproject.toml
COPY requirements/ /build/requirements/
COPY containers/pins.py /build/containers/pins.py
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3 setuptools==84.2.1 \
    && python /build/containers/pins.py cpu > /build/requirements.txt \
    && python /build/containers/pins.py cpu --lock > /build/constraints.txt \
    && pip install --no-cache-dir -r /build/requirements.txt -c /build/constraints.txt \
    && pip check

# The code, for non-fast registration (`--copy none`); fast registration overlays the same paths.
WORKDIR /root
COPY core/ /root/core/
COPY tasks/ /root/tasks/
COPY workflows/ /root/workflows/
