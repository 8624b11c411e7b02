"""Output integrity (issue 23, output side): nothing stale, no two writers, resume that checks.

Each test reproduces an audit finding on a small input made here: a smaller export into a folder that held
a bigger one, a publish over an earlier run, two ingests racing into one run folder (in two processes),
writers sharing temp names, a resume after a config change, an embedding folder mixing two models.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from export_train_fixtures import make_records
from PIL import Image

from core.foundation.ledger import LedgerWriter, read_ledger, step_dir
from core.foundation.sample import Sample
from core.foundation.step import (
    STAMP_FILE,
    FolderBusy,
    Passing,
    ShardStep,
    StepMismatch,
    ensure_stamp,
    folder_lock,
    shards_of,
    write_atomic,
)
from core.io.ingest import IngestConfig, ingest
from core.io.publish import RECORD, publish
from core.io.wds import ShardWriter, iter_samples, list_shards, write_shards
from core.steps.embed.config import tiny_embed_config
from core.steps.embed.store import MixedModels, build_table, load_embeddings, table_bytes
from core.steps.export import ExportConfig, export_curated, manifest_shards, verify_export

FORK = mp.get_context("fork")


def _sharded_samples(root, n: int, seed: int, per_shard: int) -> list[Sample]:
    """`n` generated samples (with their images) written as WDS shards of `per_shard` under `root/shards`."""
    samples = []
    for rec, imgs in make_records(n, seed=seed):
        s = Sample.from_record(rec)
        s.image_bytes = imgs
        samples.append(s)
    write_shards(samples, str(root / "shards"), max_samples=per_shard)
    return samples


# ---- stale outputs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run120(tmp_path_factory):
    """A run of 120 samples (one ingest ledger keeping all), in 3 input shards."""
    root = tmp_path_factory.mktemp("run120")
    samples = _sharded_samples(root, 120, seed=3, per_shard=50)
    with LedgerWriter(step_dir(root, "ingest") / "part-0.parquet", "ingest") as led:
        for s in samples:
            led.add(s.id, "keep")
    return root, [s.id for s in samples]


def test_a_smaller_export_into_the_same_folder_leaves_nothing_old(run120, tmp_path):
    root, ids = run120
    out = tmp_path / "export"
    cfg = ExportConfig(max_samples=10)
    big = export_curated(list_shards(str(root / "shards")), str(root), str(out), cfg)
    assert big["n_samples"] == 120 and len(list((out / "shards").glob("**/*.tar"))) == 12
    small = export_curated(list_shards(str(root / "shards")), str(root), str(out),
                           ExportConfig(max_samples=10, subset_name="ten"), subset_ids=ids[:10])
    tars = sorted(p.relative_to(out / "shards").as_posix() for p in (out / "shards").glob("**/*.tar"))
    assert small["n_samples"] == 10 and tars == sorted(s["name"] for s in small["shards"])
    assert len(tars) == len(small["kinds"]) <= 3  # one shard per kind folder, nothing of the 12 old tars
    # a trainer reading the manifest and one globbing the folder see the same 10 samples
    assert manifest_shards(str(out)) == [f"{out}/shards/{s['name']}" for s in small["shards"]]
    assert sorted(s.id for s in iter_samples(sorted(map(str, (out / "shards").glob("**/*.tar"))))) == sorted(ids[:10])
    assert len(read_ledger(out / "ledger" / "export")) == 10
    verify_export(str(out))
    # no staging or moved-aside folder is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failed_export_keeps_the_previous_one_whole(run120, tmp_path, monkeypatch):
    root, _ = run120
    out = tmp_path / "export"
    first = export_curated(list_shards(str(root / "shards")), str(root), str(out), ExportConfig(max_samples=50))
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("core.steps.export.to_loader_schema", boom)  # dies mid-export (not a count mismatch)
    with pytest.raises(OSError, match="disk full"):
        export_curated(list_shards(str(root / "shards")), str(root), str(out), ExportConfig(max_samples=10))
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before
    assert json.loads((out / "manifest.json").read_text())["n_samples"] == first["n_samples"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_publish_replaces_the_previous_run(tmp_path):
    def build(name, tars):
        src = tmp_path / name
        (src / "export" / "shards").mkdir(parents=True)
        (src / "summary.json").write_text(json.dumps({"run": name}))
        for t in tars:
            (src / "export" / "shards" / t).write_bytes(name.encode())
        return src

    dest = tmp_path / "out" / "run"
    publish(str(build("first", [f"shard-{i:06d}.tar" for i in range(12)])), str(dest))
    publish(str(build("second", ["shard-000000.tar"])), str(dest))
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == [RECORD, "export/shards/shard-000000.tar", "summary.json"]
    assert (dest / "export" / "shards" / "shard-000000.tar").read_bytes() == b"second"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["run"]  # the previous run was all ours: removed


def test_publish_to_an_object_store_removes_what_it_published_and_refuses_foreign_files(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    src = tmp_path / "a"
    (src / "shards").mkdir(parents=True)
    for i in range(3):
        (src / "shards" / f"s{i}.tar").write_bytes(b"a")
    root = f"/pub-{tmp_path.name}"
    publish(str(src), f"memory://{root}/run")
    for i in (1, 2):
        (src / "shards" / f"s{i}.tar").unlink()
    publish(str(src), f"memory://{root}/run")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/run")) == [RECORD, "s0.tar"]
    fs.pipe(f"{root}/other/old.tar", b"someone else's")
    with pytest.raises(FileExistsError, match="old.tar"):
        publish(str(src), f"memory://{root}/other")
    assert fs.cat(f"{root}/other/old.tar") == b"someone else's"  # refused before touching anything


def test_a_re_ingest_with_fewer_records_leaves_no_old_shard(tmp_path):
    run = tmp_path / "run"
    _ingest_source(tmp_path, "a", 60, run, shard_max_samples=10)
    assert len(list_shards(str(run / "shards"))) == 6
    res = _ingest_source(tmp_path, "b", 15, run, shard_max_samples=10)
    assert [Path(u).name for u in list_shards(str(run / "shards"))] == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads((run / "shards" / "manifest.json").read_text())["summary"]["kept"] == res.n_kept == 15


# ---- one writer per folder --------------------------------------------------------------------------
def _source(tmp: Path, tag: str, n: int) -> tuple[Path, Path]:
    img = tmp / f"img-{tag}"
    img.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (i % 256, 7 * i % 256, 99)).save(buf, "JPEG")
        (img / f"{i}.jpg").write_bytes(buf.getvalue())
        lines.append(json.dumps({"id": f"{tag}{i}", "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]}))
    (tmp / f"{tag}.jsonl").write_text("\n".join(lines))
    return tmp / f"{tag}.jsonl", img


def _ingest_source(tmp: Path, tag: str, n: int, run: Path, **kw):
    src, img = _source(tmp, tag, n)
    return ingest(IngestConfig(str(src), str(img), str(run), **kw), progress_every=0)


def _held_ingest(src, img, run, started, release, q):
    """Ingest in a child process that pauses after its first record until the parent releases it."""
    import core.io.ingest as ci

    real = ci.iter_source

    def paused(*a, **k):
        for i, r in enumerate(real(*a, **k)):
            if i == 1:
                started.set()
                release.wait(60)
            yield r

    ci.iter_source = paused
    try:
        r = ingest(IngestConfig(str(src), str(img), str(run), shard_max_samples=20), progress_every=0)
        q.put(("ok", r.n_kept))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put(("error", f"{type(e).__name__}: {e}"))


def test_a_second_ingest_into_the_same_run_folder_refuses_and_the_first_stays_consistent(tmp_path):
    run = tmp_path / "run"
    a, b = _source(tmp_path, "a", 200), _source(tmp_path, "b", 200)
    started, release, q = FORK.Event(), FORK.Event(), FORK.Queue()
    first = FORK.Process(target=_held_ingest, args=(*a, run, started, release, q))
    first.start()
    try:
        assert started.wait(60), "the first ingest did not start"
        with pytest.raises(FolderBusy) as busy:  # the second writer, while the first is mid-shard
            ingest(IngestConfig(str(b[0]), str(b[1]), str(run), shard_max_samples=20), progress_every=0)
        msg = str(busy.value)
        assert f'"pid": {first.pid}' in msg and "ingest of" in msg and str(a[0]) in msg and "host" in msg
    finally:
        release.set()
        first.join(60)
    assert q.get(timeout=10) == ("ok", 200)
    led = read_ledger(run / "ledger" / "ingest")
    have: dict[str, set[str]] = {}
    for s in iter_samples(list_shards(str(run / "shards"))):
        have.setdefault(s.shard, set()).add(s.id)
    keep = led[led.decision == "keep"]
    assert len(keep) == 200 and all(i in have.get(sh, ()) for i, sh in zip(keep.sample_id, keep.shard))
    assert sorted(i for v in have.values() for i in v) == sorted(f"a{i}" for i in range(200))
    assert not (run / "ledger" / "ingest" / ".writer.lock").exists()  # released


def _hold_lock_and_die(folder, ready):
    with folder_lock(folder, "doomed"):
        ready.set()
        os._exit(1)  # killed while holding: no clean release


def test_a_dead_writer_leaves_no_lock_behind(tmp_path):
    ready = FORK.Event()
    p = FORK.Process(target=_hold_lock_and_die, args=(tmp_path, ready))
    p.start()
    p.join(30)
    assert ready.is_set() and (tmp_path / ".writer.lock").exists()  # its file stays, its lock does not
    with folder_lock(tmp_path, "next") as path:
        assert json.loads(path.read_text())["what"] == "next"


def test_racing_writers_of_one_file_never_share_a_temp_file(tmp_path):
    """Threads share a pid: with pid-based temp names they wrote into one temp file and renamed it away
    from each other (FileNotFoundError, or a file mixing both)."""
    target = tmp_path / "x.bin"
    payloads = [bytes([k]) * (1 << 18) for k in range(4)]
    errors: list[BaseException] = []
    go = threading.Barrier(4)

    def writer(k):
        go.wait()
        try:
            for _ in range(30):
                write_atomic(target, payloads[k])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temp file left


def test_racing_ledger_and_shard_writers_each_publish_whole_files(tmp_path):
    samples = {}
    for k in range(2):
        samples[k] = []
        for rec, imgs in make_records(30, seed=10 + k):
            rec["id"] = f"w{k}-{rec['id']}"
            s = Sample.from_record(rec)
            s.image_bytes = imgs
            samples[k].append(s)
    errors: list[BaseException] = []
    go = threading.Barrier(2)

    def writer(k):
        go.wait()
        try:
            with ShardWriter(str(tmp_path / "shards"), max_samples=10) as w:
                for s in samples[k]:
                    w.write(s)
            with LedgerWriter(tmp_path / "ledger" / "part-0.parquet", "x") as led:
                for s in samples[k]:
                    led.add(s.id, "keep")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    ids = {k: {s.id for s in v} for k, v in samples.items()}
    for url in list_shards(str(tmp_path / "shards")):  # every shard is one writer's whole shard
        with tarfile.open(url) as tf:
            got = {m.name.split(".")[0] for m in tf.getmembers()}
        assert len(got) == 10 and any(got <= v for v in ids.values())
    assert set(read_ledger(tmp_path / "ledger")["sample_id"]) in ids.values()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]


# ---- resume that checks -----------------------------------------------------------------------------
@dataclass
class LenConfig:
    min_len: int = 1
    device: str = "cpu"  # scheduling: a resume may change it


class LenStep(ShardStep):
    name = "lengths"

    def __init__(self, out, cfg: LenConfig, fail_on: str = ""):
        super().__init__(out)
        self.cfg, self.fail_on = cfg, fail_on

    def process(self, unit, led):
        for s in self.read(unit, led):
            if s.id == self.fail_on:
                raise RuntimeError("crash")
            if len(s.conversations) >= self.cfg.min_len:
                led.add(s.id, "keep")
            else:
                led.add(s.id, "drop", "short")


@pytest.fixture(scope="module")
def run30(tmp_path_factory):
    root = tmp_path_factory.mktemp("run30")
    return root, _sharded_samples(root, 30, seed=5, per_shard=10)


def test_resume_with_another_config_refuses_naming_the_fields(run30, tmp_path):
    root, samples = run30
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crash"):
        LenStep(out, LenConfig(), fail_on=samples[15].id).run(shards_of(root))  # shard 0 done, shard 1 not
    stamp = json.loads((step_dir(out, "lengths") / STAMP_FILE).read_text())
    assert stamp["step"] == "lengths" and stamp["config"] == {"min_len": 1} and stamp["code_version"]
    with pytest.raises(StepMismatch) as e:
        LenStep(out, LenConfig(min_len=2)).run(shards_of(root))
    assert "min_len: 1 -> 2" in str(e.value) and e.value.fields == ["min_len: 1 -> 2"]
    assert sorted(p.name for p in step_dir(out, "lengths").glob("*.parquet")) == ["part-shard-000000.parquet"]
    # a scheduling field may change: the same config resumes, skipping the finished shard
    s = LenStep(out, LenConfig(device="cuda")).run(shards_of(root))
    assert s.skipped == ["shard-000000"] and s.done == ["shard-000001", "shard-000002"]
    # recompute: the folder is cleared and every shard redone under the new stamp
    again = LenStep(out, LenConfig(min_len=2))
    again.on_mismatch = "recompute"
    s = again.run(shards_of(root))
    assert s.skipped == [] and len(s.done) == 3
    assert json.loads((step_dir(out, "lengths") / STAMP_FILE).read_text())["config"] == {"min_len": 2}
    assert len(read_ledger(step_dir(out, "lengths"))) == 30


def test_a_folder_with_parts_but_no_stamp_refuses(run30, tmp_path):
    root, _ = run30
    out = tmp_path / "out"
    LenStep(out, LenConfig()).run(shards_of(root))
    (step_dir(out, "lengths") / STAMP_FILE).unlink()  # as made before stamps existed
    with pytest.raises(StepMismatch, match="no stamp"):
        LenStep(out, LenConfig()).run(shards_of(root))


def test_a_second_step_writer_of_one_folder_refuses(run30, tmp_path):
    root, _ = run30
    out = tmp_path / "out"
    held = LenStep(out, LenConfig())
    with held.writing():
        with pytest.raises(FolderBusy, match="step lengths"):
            LenStep(out, LenConfig()).run(shards_of(root))
    assert LenStep(out, LenConfig()).run(shards_of(root)).done  # released


def test_ensure_stamp_for_code_outside_the_base(tmp_path):
    cleared = []
    assert ensure_stamp(tmp_path, "train", {"lr": 1e-3, "epochs": 2}, code_version="c1") == "new"
    assert ensure_stamp(tmp_path, "train", {"lr": 1e-3, "epochs": 2}, code_version="c1") == "resume"
    with pytest.raises(StepMismatch) as e:
        ensure_stamp(tmp_path, "train", {"lr": 1e-4, "epochs": 2}, code_version="c2")
    assert e.value.fields == ["code_version: \"c1\" -> \"c2\"", "lr: 0.001 -> 0.0001"]
    assert ensure_stamp(tmp_path, "train", {"lr": 1e-4, "epochs": 2}, code_version="c2",
                        on_mismatch="recompute", clear=lambda: cleared.append(1)) == "recompute"
    assert cleared == [1]
    assert ensure_stamp(tmp_path, "train", {"lr": 1e-4, "epochs": 2}, code_version="c2") == "resume"


def test_embed_rerun_with_another_model_refuses_instead_of_reporting_done(tmp_path):
    """The audit: embed re-run with another model name and seed reported every shard done."""
    from core.steps.embed import embed_shards
    from core.steps.embed.pipeline import EmbedStep

    samples = []
    for rec, imgs in make_records(8, seed=2):
        s = Sample.from_record(rec)
        s.image_bytes = imgs
        samples.append(s)
    urls = [i.path for i in write_shards(samples, str(tmp_path / "shards"), max_samples=4)]
    first = tiny_embed_config(cache_dir=str(tmp_path / "cache"))
    step = EmbedStep(str(tmp_path / "run" / "embed"), first)
    with step.writing():  # shards finished with the first model (its files and ledger parts)
        for u in step.units(urls):
            write_atomic(step.emb_path(u.name), _emb_file([s.id for s in samples], first))
            with LedgerWriter(step.part(u.name), "embed") as led:
                led.add(f"id-{u.name}", "keep")
    other = tiny_embed_config(cache_dir=str(tmp_path / "cache"), seed=7)
    other.model_name = "ViT-B-16"
    with pytest.raises(StepMismatch) as e:
        embed_shards(urls, str(tmp_path / "run" / "embed"), other, use_ray=False)
    assert "model_name: \"mmcurate-tiny-vit\" -> \"ViT-B-16\"" in str(e.value) and "seed: 0 -> 7" in str(e.value)
    # the same model resumes: every shard is done
    assert len(embed_shards(urls, str(tmp_path / "run" / "embed"), first, use_ray=False).skipped) == 2


def _emb_file(ids, cfg, dim=4) -> bytes:
    rng = np.random.default_rng(len(ids))
    v = rng.normal(size=(len(ids), dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rows = [{"sample_id": i, "source": "t", "n_images": 1, "image_start": k, "text_row": k} for k, i in enumerate(ids)]
    return table_bytes(build_table(rows, image_vecs=v, image_norms=np.ones(len(ids), np.float32), text_vecs=v,
                                   text_norms=np.ones(len(ids), np.float32), cfg=cfg, dim=dim))


def test_load_embeddings_refuses_a_folder_mixing_models(tmp_path):
    from core.steps.dedup.embeddings import read_embeddings

    a = tiny_embed_config(cache_dir=str(tmp_path))
    b = tiny_embed_config(cache_dir=str(tmp_path), seed=1)
    d = tmp_path / "embed"
    d.mkdir()
    (d / "shard-000000.parquet").write_bytes(_emb_file(["x", "y"], a))
    assert load_embeddings(d, "image")[0] == ["x", "y"]
    assert json.loads(pq.read_schema(d / "shard-000000.parquet").metadata[b"mmcurate.embed"])["seed"] == 0
    (d / "shard-000001.parquet").write_bytes(_emb_file(["z"], b))
    with pytest.raises(MixedModels, match="seed: 0 vs 1"):
        load_embeddings(d, "image")
    with pytest.raises(MixedModels):
        read_embeddings(d, "image")  # the dedup/decontam reader refuses too


def test_passing_is_unchanged_by_the_stamp(run30, tmp_path):
    """The stamp and lock files sit beside the ledger parts without being read as ledger rows."""
    root, samples = run30
    out = tmp_path / "out"
    LenStep(out, LenConfig()).run(shards_of(root))
    assert len(Passing.read(out, "lengths")) == 30
