"""Session-wide test isolation and shared fixtures.

Isolation: every test run keeps its state inside the checkout's `.state/` (HOME, TMPDIR, caches, Ray's temp
dir, flytekit's local cache and sandbox), offline for Hugging Face. `make test` sets the same variables
(MMCURATE_STATE marks that it did); running `pytest` directly gets them here, before any test imports
tempfile users, torch, Ray or flytekit.

Fixtures for everyone:
- `moto_s3`: a real S3 endpoint (moto server on 127.0.0.1, free port) with a fresh bucket; s3fs/fsspec and
  flytekit reach it through the environment, so plain `fsspec.open("s3://bucket/key")` works.
- `flyte_local_cache`: flytekit's local task cache, emptied before and after the test.
- session teardown shuts Ray down if a test started it; the per-test flytekit cache reset keeps cached task
  results of one test out of the next; each test gets its own MMCURATE_RESUME_ROOT (tasks/paths.py).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Ray adds ~70 bytes (/ray/session_<date>_<pid>/sockets/plasma_store) under RAY_TMPDIR and Linux caps a
# socket path at 107 bytes; a longer checkout path falls back to a per-checkout dir under /tmp.
RAY_TMPDIR_MAX = 36


def _ray_tmpdir(state: Path) -> str:
    inside = str(state / "ray")
    if len(inside) <= RAY_TMPDIR_MAX:
        return inside
    return "/tmp/mmc-ray-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]


def _isolate() -> None:
    """Point every per-user location at .state/ unless `make test` already did (MMCURATE_STATE set)."""
    if os.environ.get("MMCURATE_STATE"):
        state = Path(os.environ["MMCURATE_STATE"])
    else:
        state = ROOT / ".state"
        os.environ["MMCURATE_STATE"] = str(state)
        dirs = {
            "HOME": "home",
            "TMPDIR": "tmp",
            "XDG_CACHE_HOME": "cache",
            "XDG_CONFIG_HOME": "config",
            "HF_HOME": "hf",
            "MPLCONFIGDIR": "mpl",
            "TORCH_HOME": "torch",
        }
        for var, sub in dirs.items():
            os.environ[var] = str(state / sub)
        os.environ["RAY_TMPDIR"] = _ray_tmpdir(state)
    for var in (
        "HOME",
        "TMPDIR",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "HF_HOME",
        "MPLCONFIGDIR",
        "TORCH_HOME",
        "RAY_TMPDIR",
    ):
        if os.environ.get(var):
            Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    # Offline and quiet, whatever the caller's shell says.
    for var, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ[var] = value
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    tempfile.tempdir = None  # re-read TMPDIR on the next tempfile call


_isolate()


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray with 2 CPUs for the module's fan-out tests (2 workers), shut down after the module."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray():
    """Shut Ray down at the end of the session if any test started it (no stray raylets)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def _fresh_flyte_cache():
    """Empty flytekit's local task cache around each test that has flytekit loaded (independent tests)."""
    if "flytekit" in sys.modules:
        from flytekit.core.local_cache import LocalTaskCache

        LocalTaskCache.clear()
    yield


@pytest.fixture(scope="session", autouse=True)
def _session_resume_root(tmp_path_factory):
    """A fresh resume root for the session (module- and session-scoped fixtures that run step tasks)."""
    old = os.environ.get("MMCURATE_RESUME_ROOT")
    os.environ["MMCURATE_RESUME_ROOT"] = str(tmp_path_factory.mktemp("resume_root_session"))
    yield
    if old is None:
        os.environ.pop("MMCURATE_RESUME_ROOT", None)
    else:
        os.environ["MMCURATE_RESUME_ROOT"] = old


@pytest.fixture(autouse=True)
def _own_resume_root(tmp_path_factory, monkeypatch):
    """A fresh resume root per test (tasks/paths.py `step_workdir`): no test resumes another one's step folder."""
    monkeypatch.setenv("MMCURATE_RESUME_ROOT", str(tmp_path_factory.mktemp("resume_root")))


@pytest.fixture()
def flyte_local_cache():
    """flytekit's local task cache (`LocalTaskCache`), empty at start and cleared again afterwards."""
    from flytekit.core.local_cache import LocalTaskCache

    LocalTaskCache.clear()
    try:
        yield LocalTaskCache
    finally:
        LocalTaskCache.clear()


class MotoS3(NamedTuple):
    """What `moto_s3` yields; unpacks as `endpoint_url, bucket, storage_options = moto_s3`."""

    endpoint_url: str
    bucket: str
    storage_options: dict


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server for the session on 127.0.0.1 and a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture()
def moto_s3(moto_server, monkeypatch):
    """A fresh, empty bucket on the moto server, with the environment wired so that all of these work:

    - ``fsspec.open(f"s3://{bucket}/key")`` and ``fsspec.filesystem("s3")`` (AWS_ENDPOINT_URL + keys),
    - ``fsspec.filesystem("s3", **storage_options)`` (explicit endpoint and keys),
    - flytekit's own S3 access in local runs (FLYTE_AWS_ENDPOINT + keys).
    """
    import requests
    import s3fs

    requests.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ENDPOINT_URL_S3": moto_server,
        "FLYTE_AWS_ENDPOINT": moto_server,
        "FLYTE_AWS_ACCESS_KEY_ID": "testing",
        "FLYTE_AWS_SECRET_ACCESS_KEY": "testing",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    storage_options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": moto_server},
    }
    bucket = f"mmc-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would keep a stale listing cache
    s3fs.S3FileSystem(**storage_options).mkdir(bucket)
    try:
        yield MotoS3(moto_server, bucket, storage_options)
    finally:
        _close_s3_sessions()


def _close_s3_sessions() -> None:
    """Close the aiohttp sessions of cached s3fs instances (async ones, e.g. flytekit's, have no finalizer)."""
    import fsspec.asyn
    import s3fs

    classes, todo = [], [s3fs.S3FileSystem]
    while todo:  # flytekit uses its own subclass, with its own instance cache
        cls = todo.pop()
        classes.append(cls)
        todo.extend(cls.__subclasses__())
    for cls in classes:
        for fs in list(cls._cache.values()):
            creator = getattr(fs, "_s3creator", None)
            if creator is None:
                continue
            # an asynchronous instance forgets its loop (fs.loop is None) but keeps it in storage_options
            loop = fs.storage_options.get("loop") if fs.asynchronous else fs.loop
            if loop is not None and loop.is_running():  # s3fs's own close gives up after 0.1 s
                fsspec.asyn.sync(loop, creator.__aexit__, None, None, None, timeout=10)
            else:
                s3fs.S3FileSystem.close_session(loop, creator)
        cls.clear_instance_cache()


@pytest.fixture(scope="session")
def flyte_package(tmp_path_factory) -> Path:
    """The repository's `pyflyte package` archive (images bound to test references), built once per session and
    shared by every test that reads what a cluster would receive (tests/package_checks.py reads it)."""
    from tests.package_checks import build_package

    return build_package(ROOT, tmp_path_factory.mktemp("pkg") / "flyte-package.tgz")

