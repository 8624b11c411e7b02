# mmcurate CPU image: every CPU task (ingest, dedup, export, reports, eval scoring).
# Bound to the `cpu` image placeholder (tasks/images.py) and to tasks without one (`make package`/`register`).
# Build from the repository root: `make images` (podman; see docs/containers.md), or by hand
#   podman build -f containers/cpu.Dockerfile -t REGISTRY/mmcurate-cpu:VERSION .
#   (docker build works too; --build-arg BASE=localhost/mmcurate-base:bookworm where no registry is reachable)
# Installs exactly pyproject.toml's pins (containers/pins.py cpu) with requirements/lock.txt as constraints:
# the same environment `make setup` builds and `make test` tests (torch is PyPI's CUDA build, used on CPU).
# The `smoke` stage runs one small real pipeline step inside the build (containers/smoke.py cpu); the final
# image copies its report, so an image only exists if its smoke step passed.
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE} AS image

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/root \
    OMP_NUM_THREADS=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# Pins first, code last: a code change rebuilds only the last layers.
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

# Smoke: demo data -> ingest task -> export task, offline, as the image's user would run them.
FROM image AS smoke
COPY containers/smoke.py /build/containers/smoke.py
RUN python /build/containers/smoke.py cpu --report /build/smoke-cpu.json

FROM image
COPY --from=smoke /build/smoke-cpu.json /build/smoke-cpu.json
