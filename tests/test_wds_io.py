"""The fast WDS writer and reader match plain tarfile byte for byte and behave like the streaming
reader on every kind of cut."""

from __future__ import annotations

import hashlib
import io
import tarfile

import fsspec
import pytest
from PIL import Image

from core.ledger import LedgerWriter
from core.sample import Sample
from core.wds import _tarinfo, iter_shard, sample_members, write_shards


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, 90, 200)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _sample(sid: str, n_images: int, answer: str = "An answer.") -> Sample:
    q = "<image>\n" * n_images + "What is it?"
    rec = {"id": sid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]}
    if n_images:
        rec["image"] = [f"{sid}_{i}.jpg" for i in range(n_images)] if n_images > 1 else f"{sid}.jpg"
    s = Sample.from_record(rec)
    s.image_bytes = [_jpeg(i + len(sid)) for i in range(n_images)]
    return s


def _samples() -> list[Sample]:
    out = [_sample(f"s{i:03d}", i % 3, "x" * (i * 97 + 1)) for i in range(9)]
    out.append(_sample("textonly", 0))
    odd = _sample("sixteen", 1)
    odd.image_bytes = [odd.image_bytes[0] + b"\0" * (-len(odd.image_bytes[0]) % 512)]  # data ends on a block
    out.append(odd)
    return out


def _reference_tar(samples: list[Sample]) -> bytes:
    """What the original writer produced: TarFile.addfile of every member, USTAR, fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for name, data in sample_members(s):
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def test_shards_equal_tarfile_addfile_bytes(tmp_path):
    samples = _samples()
    infos = write_shards(samples, str(tmp_path), max_samples=4)
    assert [i.n_samples for i in infos] == [4, 4, 3]
    for k, info in enumerate(infos):
        want = _reference_tar(samples[4 * k:4 * k + 4])
        got = (tmp_path / f"shard-{k:06d}.tar").read_bytes()
        assert got == want
        assert info.n_bytes == len(want) and info.sha256 == hashlib.sha256(want).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))


def test_long_id_is_written_and_read_back(tmp_path):
    # USTAR holds 100-byte names; a safe 120-char id used to crash the writer ("name is too long")
    s = _sample("a" * 120, 2)
    short = _sample("short", 1)
    write_shards([short, s], str(tmp_path))
    got = list(iter_shard(str(tmp_path / "shard-000000.tar")))
    assert [g.id for g in got] == ["short", s.id]
    assert got[1].image_bytes == s.image_bytes
    names = tarfile.open(tmp_path / "shard-000000.tar").getnames()
    assert names[:2] == ["short.json", "short.jpg"] and names[2] == f"{s.id}.json"


def _read(url: str) -> tuple[list[str], dict[str, int]]:
    with LedgerWriter(f"{url.replace('://', '_').replace('/', '_')}.parquet", "x") as led:
        ids = [x.id for x in iter_shard(url, quarantine=led)]
        led.add("__end__", "keep")
    return ids, dict(led.reasons)


@pytest.mark.parametrize("cut", ["none", "mid_data", "mid_header", "member_boundary", "end_blocks", "one_zero_block"])
def test_local_reader_matches_stream_reader_on_cuts(tmp_path, monkeypatch, cut):
    samples = _samples()[:6]
    write_shards(samples, str(tmp_path / "w"), max_samples=100)
    data = (tmp_path / "w" / "shard-000000.tar").read_bytes()
    tar = tarfile.open(fileobj=io.BytesIO(data))
    offsets = [m.offset for m in tar.getmembers()]
    end = tar.offset  # where the end-of-archive blocks start
    cuts = {
        "none": len(data),
        "mid_data": offsets[5] + 700,
        "mid_header": offsets[5] + 100,
        "member_boundary": offsets[5],
        "end_blocks": end,
        "one_zero_block": end + 512,
    }
    cut_data = data[:cuts[cut]]
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "c" / "shard-000000.tar"
    local.parent.mkdir()
    local.write_bytes(cut_data)
    with fsspec.open("memory://c/shard-000000.tar", "wb") as f:
        f.write(cut_data)
    got_local, got_stream = _read(str(local)), _read("memory://c/shard-000000.tar")
    assert got_local == got_stream
    if cut == "none":
        assert got_local == ([s.id for s in samples], {})
    else:
        assert got_local[1].get("truncated_tar", 0) >= 1 and len(got_local[0]) < len(samples)
