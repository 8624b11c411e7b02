"""The shared test fixtures (tests/conftest.py) do what other tests rely on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from conftest import RAY_TMPDIR_MAX, ROOT


def test_state_is_isolated_inside_the_checkout():
    state = Path(os.environ["MMCURATE_STATE"])
    assert state.is_relative_to(ROOT)
    for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "MPLCONFIGDIR"):
        assert Path(os.environ[var]).is_relative_to(state), var
    assert Path(tempfile.gettempdir()).is_relative_to(state)
    assert Path("~").expanduser().is_relative_to(state)
    # Ray's socket paths must fit in 107 bytes: RAY_TMPDIR is short, inside the checkout when it can be.
    ray_tmp = os.environ["RAY_TMPDIR"]
    assert len(ray_tmp) <= RAY_TMPDIR_MAX or ray_tmp.startswith("/tmp/mmc-ray-")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_tmp_path_is_inside_the_state_dir(tmp_path):
    assert tmp_path.is_relative_to(Path(os.environ["MMCURATE_STATE"]))


def test_moto_s3_works_with_storage_options_env_and_boto3(moto_s3):
    import boto3
    import fsspec

    endpoint_url, bucket, storage_options = moto_s3
    fs = fsspec.filesystem("s3", **storage_options)
    fs.pipe(f"{bucket}/dir/a.txt", b"hello")
    # plain fsspec.open with no options: endpoint and keys come from the environment
    with fsspec.open(f"s3://{bucket}/dir/a.txt", "rb") as fh:
        assert fh.read() == b"hello"
    with fsspec.open(f"s3://{bucket}/dir/b.txt", "wb") as fh:
        fh.write(b"world")
    assert sorted(fs.ls(f"{bucket}/dir", refresh=True)) == [f"{bucket}/dir/a.txt", f"{bucket}/dir/b.txt"]
    # a plain boto3 client reaches the same server (AWS_ENDPOINT_URL)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["dir/a.txt", "dir/b.txt"]
    assert endpoint_url.startswith("http://127.0.0.1:")


def test_moto_s3_gives_each_test_an_empty_bucket(moto_s3):
    import fsspec

    fs = fsspec.filesystem("s3", **moto_s3.storage_options)
    assert fs.ls(moto_s3.bucket, refresh=True) == []
    assert fs.ls("", refresh=True) == [moto_s3.bucket]  # the previous test's bucket is gone


def test_flytekit_reaches_moto_s3(moto_s3, tmp_path):
    from flytekit.core.data_persistence import FileAccessProvider

    src = tmp_path / "x.bin"
    src.write_bytes(b"\x00\x01payload")
    fa = FileAccessProvider(local_sandbox_dir=str(tmp_path / "sandbox"), raw_output_prefix=f"s3://{moto_s3.bucket}/raw")
    remote = fa.put_data(str(src), f"s3://{moto_s3.bucket}/flyte/x.bin")
    dst = tmp_path / "back.bin"
    fa.get_data(remote, str(dst))
    assert dst.read_bytes() == b"\x00\x01payload"


def test_flyte_local_cache_fixture_starts_empty(flyte_local_cache):
    assert len(flyte_local_cache._cache) == 0
    assert Path(flyte_local_cache._cache.directory).is_relative_to(Path(os.environ["MMCURATE_STATE"]))
