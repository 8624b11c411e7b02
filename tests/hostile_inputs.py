"""Hostile inputs for ingest, each built small inside the test's folder, and the ingest run that meets them.

Every case is a source of three records: two good ones around one hostile record (or member, or image).
`run_case` ingests it and returns what the ledger says; tests/unit/test_hostile_ingest.py runs it in a capped
child (tests/capped.py) and benchmarks/hostile_inputs.py prints the table of docs/security.md.

    CASES[name](folder) -> Case(source, image_root, expected {ledger id: reason}, good ids)
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass
class Case:
    source: Path
    image_root: Path | str
    expected: dict[str, str]  # ledger row id -> quarantine reason
    good: list[str]  # ids that must be kept
    config: dict[str, Any] = field(default_factory=dict)


def jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def rec(sid: str, image: str | None = "a.jpg", **extra: Any) -> dict[str, Any]:
    q = "<image>\nWhat color?" if image else "What color?"
    r: dict[str, Any] = {"id": sid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "Red."}]}
    if image:
        r["image"] = image
    return {**r, **extra}


def _images(d: Path) -> Path:
    root = d / "images"
    root.mkdir(exist_ok=True)
    (root / "a.jpg").write_bytes(jpeg())
    return root


def _jsonl(d: Path, name: str, middle: bytes) -> Case:
    src = d / f"{name}.jsonl"
    src.write_bytes(json.dumps(rec("g0")).encode() + b"\n" + middle + b"\n" + json.dumps(rec("g2")).encode() + b"\n")
    return Case(src, _images(d), {}, ["g0", "g2"])


def _array(d: Path, name: str, middle: bytes) -> Case:
    src = d / f"{name}.json"
    src.write_bytes(b"[" + json.dumps(rec("g0")).encode() + b",\n" + middle + b",\n" + json.dumps(rec("g2")).encode() + b"]")
    return Case(src, _images(d), {}, ["g0", "g2"])


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ---- JSON ---------------------------------------------------------------------------------------------
def deep_jsonl(d: Path) -> Case:
    """A JSONL record with a 3,000-deep list in metadata (json.loads: RecursionError ended ingest)."""
    middle = b'{"id": "deep", "conversations": [], "metadata": {"x": ' + _deep(3000) + b"}}"
    c = _jsonl(d, "deep", middle)
    c.expected = {"deep#1": "too_deep"}
    return c


def deep_array(d: Path) -> Case:
    """A 200 KB JSON-array item nested 100,000 deep (ijson went to 24 GB)."""
    c = _array(d, "deeparr", _deep(100_000))
    c.expected = {"deeparr#1": "too_deep"}
    return c


BIG_INT = b"1" + b"7" * 4999  # 5,000 digits: over Python's 4,300-digit int limit


def bigint_jsonl(d: Path) -> Case:
    c = _jsonl(d, "bigint", b'{"id": ' + BIG_INT + b', "conversations": []}')
    c.expected = {"bigint#1": "oversize_int"}
    return c


def bigint_array(d: Path) -> Case:
    c = _array(d, "bigarr", b'{"id": ' + BIG_INT + b', "conversations": []}')
    c.expected = {"bigarr#1": "oversize_int"}
    return c


def big_metadata(d: Path) -> Case:
    """A record whose conversation is short but whose metadata is 20 MB (was kept, then dropped downstream
    as missing_from_shard)."""
    meta = json.dumps({"id": "fat", **rec("fat"), "metadata": {"blob": "x" * (20 << 20)}}).encode()
    c = _jsonl(d, "fat", meta)
    c.expected = {"fat#1": "oversize_record"}
    return c


def big_meta_parquet(d: Path) -> Case:
    """The same through Parquet, where no raw record bytes exist: the size as written decides (9 MB meta)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [rec("g0", None), rec("fat", None, license="x" * (9 << 20)), rec("g2", None)]
    src = d / "fat.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "license": r.get("license", "")} for r in rows]), src)
    return Case(src, "", {"fat": "oversize_record"}, ["g0", "g2"])


def many_turns(d: Path) -> Case:
    """40,000 one-character turns (was kept; per-turn template work downstream is quadratic)."""
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": "x"} for i in range(40_000)]
    c = _jsonl(d, "turns", json.dumps({"id": "long", "conversations": turns}).encode())
    c.expected = {"long": "too_many_turns"}
    return c


# ---- names ----------------------------------------------------------------------------------------------
def nul_image_name(d: Path) -> Case:
    """An image name with NUL (`open` raised ValueError: embedded null byte, ending ingest)."""
    c = _jsonl(d, "nul", json.dumps(rec("nul", "a.jpg\x00.png")).encode())
    c.expected = {"nul": "unsafe_path"}
    return c


def newline_id(d: Path) -> Case:
    """An id with a trailing newline (was kept and became the tar member `x\\n.json`)."""
    c = _jsonl(d, "nlid", json.dumps(rec("x\n")).encode())
    c.expected = {"nlid#1": "bad_id"}
    return c


# ---- images ---------------------------------------------------------------------------------------------
def fifo_image(d: Path) -> Case:
    """An image that is a FIFO (ingest blocked forever in open/read)."""
    root = _images(d)
    os.mkfifo(root / "pipe.jpg")
    c = _jsonl(d, "fifo", json.dumps(rec("fifo", "pipe.jpg")).encode())
    c.expected = {"fifo": "unsafe_path"}
    return c


def big_image_file(d: Path) -> Case:
    """A 200 MB image file (sparse on disk): refused from its size, never read."""
    root = _images(d)
    with open(root / "huge.jpg", "wb") as f:
        f.truncate(200 << 20)
    c = _jsonl(d, "hugeimg", json.dumps(rec("huge", "huge.jpg")).encode())
    c.expected = {"huge": "oversize_image"}
    return c


# ---- tars -----------------------------------------------------------------------------------------------
def gnu_sparse_header(name: str, declared: int, data_len: int) -> bytes:
    """A GNU (old format) sparse member header: `data_len` bytes on disk that tarfile expands to `declared`
    bytes on read. tarfile cannot write sparse members, so the fields are set by hand: type 'S', one
    sparse entry (offset 0, data_len bytes), the real size at byte 483, then the checksum."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mtime, ti.mode = data_len, tarfile.GNUTYPE_SPARSE, 0, 0o644
    buf = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))
    buf[386:398] = b"%011o\0" % 0  # sparse entry 0: offset
    buf[398:410] = b"%011o\0" % data_len  # sparse entry 0: bytes
    buf[482] = 0  # not extended
    buf[483:495] = b"%011o\0" % declared  # the size tarfile reports and expands to
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def _wds(d: Path, name: str, middle: Callable[[tarfile.TarFile], None]) -> Case:
    src = d / f"{name}.tar"
    with tarfile.open(src, "w", format=tarfile.GNU_FORMAT) as tar:
        for key in ("g0",):
            _add(tar, f"{key}.json", json.dumps(rec(key)).encode())
            _add(tar, f"{key}.jpg", jpeg())
        middle(tar)
        _add(tar, "g2.json", json.dumps(rec("g2")).encode())
        _add(tar, "g2.jpg", jpeg())
    return Case(src, "", {}, ["g0", "g2"])


def sparse_member(d: Path) -> Case:
    """A 10 KB tar with a GNU sparse member declaring 1 GiB (reached 2.1 GB RSS before quarantine)."""
    def middle(tar: tarfile.TarFile) -> None:
        _add(tar, "k1.json", json.dumps(rec("k1")).encode())
        data = b"\xff" * 512
        tar.fileobj.write(gnu_sparse_header("k1.jpg", 1 << 30, len(data)) + data)
        tar.offset += 512 + 512

    c = _wds(d, "sparse", middle)
    c.expected = {"sparse.tar/k1": "unsafe_member"}
    return c


def bigint_wds(d: Path) -> Case:
    def middle(tar: tarfile.TarFile) -> None:
        _add(tar, "k1.json", b'{"id": ' + BIG_INT + b', "conversations": []}')

    c = _wds(d, "bigwds", middle)
    c.expected = {"bigwds.tar/k1": "oversize_int"}
    return c


def big_member(d: Path) -> Case:
    """A 9 MB json member: over max_record_bytes, never read."""
    def middle(tar: tarfile.TarFile) -> None:
        _add(tar, "k1.json", json.dumps({**rec("k1"), "metadata": {"blob": "x" * (9 << 20)}}).encode())
        _add(tar, "k1.jpg", jpeg())

    c = _wds(d, "bigmem", middle)
    c.expected = {"bigmem.tar/k1": "oversize_record"}
    return c


CASES: dict[str, Callable[[Path], Case]] = {f.__name__: f for f in (
    deep_jsonl, deep_array, bigint_jsonl, bigint_array, bigint_wds, big_metadata, big_meta_parquet, many_turns,
    nul_image_name, newline_id, fifo_image, big_image_file, sparse_member, big_member)}


def run_case(case: Case, run_dir: Path) -> dict[str, Any]:
    """Ingest the case's source; the ledger's reasons for quarantined rows and the kept ids."""
    from core.foundation.ledger import read_ledger, step_dir
    from core.io.ingest import IngestConfig, ingest

    res = ingest(IngestConfig(source=str(case.source), image_root=str(case.image_root), run_dir=str(run_dir),
                              **case.config), progress_every=0)
    led = read_ledger(step_dir(run_dir, "ingest"))
    q = led[led.decision == "quarantine"]
    details = {sid: json.loads(x).get("detail", "") if x else "" for sid, x in zip(q.sample_id, q.extra)}
    return {"reasons": dict(zip(q.sample_id, q.reason)), "details": details,
            "kept": sorted(led[led.decision == "keep"].sample_id), "source_records": res.source_records}


def read_shard(shard: Path) -> dict[str, Any]:
    """The WDS reader (`iter_shard`, as downstream steps read shards) over a tar: kept ids and reasons."""
    from core.foundation.ledger import LedgerWriter, read_ledger, step_dir
    from core.io.wds import iter_shard

    run = shard.parent / "read"
    with LedgerWriter(step_dir(run, "read") / "part.parquet", "read") as led:
        kept = [s.id for s in iter_shard(str(shard), quarantine=led)]
    df = read_ledger(step_dir(run, "read"))
    return {"reasons": dict(zip(df.sample_id, df.reason)), "kept": kept}
