"""The fast WDS writer and reader match plain tarfile byte for byte and behave like the streaming
reader on every kind of cut."""

from __future__ import annotations

import hashlib
import io
import tarfile

import fsspec
import pytest
from PIL import Image

from core.foundation.ledger import LedgerWriter
from core.foundation.sample import Sample
from core.io.wds import iter_shard, sample_members, write_shards
from core.io.wds.members import _tarinfo


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


def test_member_header_equals_tarfile_header():
    """The template-built header is tarfile's header for every name length (PAX above 100 bytes) and size."""
    from core.io.wds.members import _TEMPLATE, _TEMPLATE_INFO, _member_header

    for n in (1, 5, 37, 99, 100, 101, 120, 140):
        for size in (0, 1, 511, 512, 513, 123_456, 8**11 - 1):
            name = ("k" * n)[: n - 4] + ".jpg" if n > 4 else "k" * n
            info = dict(_TEMPLATE_INFO, name=name, size=size)
            want = (_TEMPLATE.create_ustar_header(info, tarfile.ENCODING, "surrogateescape") if n <= 100
                    else _TEMPLATE.create_pax_header(info, tarfile.ENCODING))
            assert _member_header(name, size) == want, (n, size)
    with pytest.raises(ValueError):  # USTAR cannot hold the size: tarfile's error, as before
        _member_header("big.jpg", 8**11)


def _retar(src: bytes, **meta) -> bytes:
    """The same members and bytes in a tar written by tarfile with other metadata (not a ShardWriter shard)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(src)) as tin, tarfile.open(fileobj=buf, mode="w") as tout:
        for m in tin.getmembers():
            ti = tarfile.TarInfo(m.name)
            ti.size, ti.mtime, ti.uname = m.size, meta.get("mtime", 1_700_000_000), meta.get("uname", "someone")
            tout.addfile(ti, tin.extractfile(m))
    return buf.getvalue()


def test_plain_index_matches_tarfile_and_rejects_other_tars(tmp_path):
    """ShardWriter shards (PAX long names included) are indexed without tarfile, with tarfile's members;
    other writers' tars and damaged shards are left to tarfile (None)."""
    import os

    from core.io.wds.tars import _scan_plain

    samples = _samples() + [_sample("b" * 110, 2), _sample("c" * 128, 1)]
    write_shards(samples, str(tmp_path / "w"), max_samples=100)
    path = tmp_path / "w" / "shard-000000.tar"
    data = path.read_bytes()

    def scan(blob: bytes):
        p = tmp_path / "scan.tar"
        p.write_bytes(blob)
        fd = os.open(p, os.O_RDONLY)
        try:
            return _scan_plain(fd, len(blob))
        finally:
            os.close(fd)

    with tarfile.open(path) as tf:
        want = [(m.name, m.size, m.offset_data) for m in tf.getmembers()]
    got = scan(data)
    assert got is not None and [(m.name, m.size, m.offset_data) for m in got] == want
    assert any(len(m.name) > 100 for m in got)
    end = tarfile.open(fileobj=io.BytesIO(data)).offset
    bad = bytearray(data)
    bad[got[3].offset_data - 512 + 130] ^= 1  # one bit of a size field: the checksum no longer matches
    for blob in (_retar(data), data[:end], data[:end + 512], data[:-1], data[: got[5].offset_data + 10],
                 bytes(bad), data + b"\0" * 3, data[:end] + b"junk" + data[end + 4:]):
        assert scan(blob) is None
    assert scan(data + b"\0" * 10240) is not None  # more zero records after the end is still a clean end


def test_indexed_and_tarfile_readers_give_the_same_samples(tmp_path):
    """The same shard read through the index (ShardWriter bytes) and through tarfile (re-tarred with other
    metadata): equal samples, images and quarantine reasons, also with include_ids and lazily read images."""
    samples = _samples()
    write_shards(samples, str(tmp_path / "a"), max_samples=100)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "shard-000000.tar").write_bytes(_retar((tmp_path / "a" / "shard-000000.tar").read_bytes()))
    want = {s.id for s in samples[::2]}
    for kw in ({}, {"include_ids": want}, {"load_images": False}):
        got = [list(iter_shard(str(tmp_path / d / "shard-000000.tar"), **kw)) for d in ("a", "b")]
        assert [s.to_record() for s in got[0]] == [s.to_record() for s in got[1]]
        assert [s.image_bytes for s in got[0]] == [s.image_bytes for s in got[1]]
    assert [s.image_bytes for s in iter_shard(str(tmp_path / "a" / "shard-000000.tar"))] == \
        [s.image_bytes for s in samples]
