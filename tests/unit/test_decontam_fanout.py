"""Decontamination over the fan-out (core/runs/fanout.py): each embeddings file is scored where it runs and
publishes its mining part; the driver's reduce merges the parts into `mining/<benchmark>.parquet`.

1 worker (in-process) and 2 Ray workers give the same bytes (ledger parts, mining parts, mining files), and
those mining files are the bytes of one `NeighbourMiner` streamed over every file in order (what the step
wrote before the reduce), ties between files included. A failed file leaves the others published and no
mining file; the re-run decides only that file. The reduce opens no training embeddings file.

One local Ray (2 CPUs) for the module, as tests/unit/test_fanout.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.demo.embeddings import write_embedding_parquet
from core.foundation.ledger import read_ledger, step_dir
from core.foundation.step import Passing, write_parquet_atomic
from core.runs.fanout import FanOut, FanOutIncomplete
from core.steps.dedup import mining
from core.steps.dedup.config import DecontamConfig
from core.steps.dedup.embeddings import normalize_rows, read_embeddings
from core.steps.dedup.mining import MINING_PARTS, NeighbourMiner, decontaminate

K = 4
SIZES = (40, 3, 25, 0, 31, 12)  # a file with fewer rows than k, an empty one


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six embeddings files (111 rows), two eval sets. Planted: exact copies of eval items (dropped), one vector
    repeated in three files near eval item d1 (equal similarities across files: the reduce's tie-break), a NaN
    row (quarantined), samples without an image embedding, an id the previous step removed, a ghost id."""
    rng = np.random.default_rng(11)
    d = 16
    ev = rng.standard_normal((5, d)).astype(np.float32)
    n = sum(SIZES)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = [f"t{i:03d}" for i in range(n)]
    x[5] = ev[0] * 2.0  # copy of docvqa d0 (file 0)
    x[60] = ev[3] + 1e-4  # near copy of chartqa c0 (file 2)
    tie = ev[1] + 0.4 * rng.standard_normal(d).astype(np.float32)
    for r in (7, 44, 90):  # files 0, 2 and 4
        x[r] = tie
    x[50] = np.nan  # file 2
    root = tmp_path_factory.mktemp("decontam_world")
    emb = root / "emb"
    emb.mkdir()
    files, start = [], 0
    for f, size in enumerate(SIZES):
        rows = list(range(start, start + size))
        p = str(emb / f"shard-{f:06d}.parquet")
        if size:
            write_embedding_parquet(p, [ids[r] for r in rows], x[rows], None, null_image={"t070", "t071"})
        else:  # a file with no rows (the demo helper needs one)
            pq.write_table(pa.table({"sample_id": pa.array([], pa.string()), "image_emb": pa.array([], pa.list_(
                pa.float32())), "text_emb": pa.array([], pa.list_(pa.float32()))}), p)
        files.append(p)
        start += size
    write_embedding_parquet(str(root / "docvqa.parquet"), ["d0", "d1", "d2"], ev[:3], None)
    write_embedding_parquet(str(root / "chartqa.parquet"), ["c0", "c1"], ev[3:], None)
    evals = {"docvqa": str(root / "docvqa.parquet"), "chartqa": str(root / "chartqa.parquet")}
    prev = Passing.of([i for i in ids if i != "t020"] + ["ghost"])
    return {"files": files, "evals": evals, "prev": prev, "root": root}


def cfg(workers: int) -> DecontamConfig:
    return DecontamConfig(threshold=0.95, k=K, device="cpu", fanout=FanOut(workers=workers, group_size=2))


def outputs(out: Path) -> dict[str, bytes]:
    """Every Parquet file the step wrote, by path relative to its folder."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def streamed_mining(world, out: Path) -> dict[str, bytes]:
    """What the step wrote before the reduce: one `NeighbourMiner` per eval set, fed every file in order."""
    miners = {}
    for b, p in world["evals"].items():
        es = read_embeddings(p, "image")
        miners[b] = NeighbourMiner(es.ids, normalize_rows(es.ids, es.matrix), K)
    step = mining.DecontamStep(out, world["evals"], cfg(1), world["prev"])
    for f in world["files"]:
        _, _, ids, x = step._read(mining.Unit(f, Path(f).stem))
        for m in miners.values():
            m.add(ids, x)
    res = {}
    for b, m in miners.items():
        write_parquet_atomic(m.result(b), out / f"{b}.parquet")
        res[f"mining/{b}.parquet"] = (out / f"{b}.parquet").read_bytes()
    return res


def test_one_and_two_workers_write_the_same_bytes_as_the_streamed_miner(ray_local, world, tmp_path):
    one, two = tmp_path / "w1", tmp_path / "w2"
    c1 = decontaminate(world["files"], one, world["evals"], cfg(1), world["prev"])
    c2 = decontaminate(world["files"], two, world["evals"], cfg(2), world["prev"])
    assert c1 == c2 == {"n_input": 110, "n_dropped": 2, "n_quarantined": 2,  # t050 (NaN) and the ghost
                        "by_benchmark": {"docvqa": 1, "chartqa": 1}}
    a, b = outputs(one), outputs(two)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b.get(k)]
    assert {k for k in a if k.startswith(MINING_PARTS)} == {f"{MINING_PARTS}/part-shard-{f:06d}.parquet"
                                                            for f in range(len(SIZES))}
    ref = streamed_mining(world, tmp_path / "ref")
    assert all(a[k] == v for k, v in ref.items())
    led = read_ledger(step_dir(one, "decontam")).set_index("sample_id")
    assert set(led[led.decision == "drop"].index) == {"t005", "t060"}
    assert led.loc["t070", "reason"] == "decontam_skipped:no_image_embedding"
    assert led.loc["ghost", "reason"] == "missing_embedding" and "t020" not in led.index
    mined = pq.read_table(one / "mining" / "docvqa.parquet").to_pandas()
    d1 = mined[mined.eval_id == "d1"]
    tied = d1[d1.sample_id.isin(["t007", "t044", "t090"])]
    assert len(tied) == 3 and tied.similarity.nunique() == 1  # a real tie across three files...
    # ...ordered as the streamed pass orders it: faiss's top-k heap breaks equal similarities by heap id, the
    # later row first; the reduce's ids (file position, row) grow in the same order, so it keeps that order
    assert tied.sort_values("rank").sample_id.tolist() == ["t090", "t044", "t007"]
    assert len(mined) == 3 * K and not set(mined.sample_id) & {"t020", "t050", "t070"}


def test_failed_file_leaves_the_others_and_the_rerun_decides_only_it(ray_local, world, tmp_path):
    files = list(world["files"])
    broken = tmp_path / "emb" / "shard-000002.parquet"  # a file the storage served broken
    broken.parent.mkdir()
    broken.write_bytes(b"PAR1 not parquet")
    files[2] = str(broken)
    out = tmp_path / "dc"
    with pytest.raises(FanOutIncomplete) as e:
        decontaminate(files, out, world["evals"], cfg(2), world["prev"])
    lost = [2, 3]  # the broken file and the one after it in its group (a group stops at its first failure)
    assert e.value.unfinished == [f"shard-{f:06d}" for f in lost]
    ldir = step_dir(out, "decontam")
    others = [f"shard-{f:06d}" for f in range(len(SIZES)) if f not in lost]
    assert sorted(p.stem for p in ldir.glob("part-*.parquet")) == [f"part-{u}" for u in others]
    assert sorted(p.stem for p in (out / MINING_PARTS).glob("*.parquet")) == [f"part-{u}" for u in others]
    assert not (out / "mining").exists()  # no reduce over a partial set of files
    before = {u: (ldir / f"part-{u}.parquet").stat().st_mtime_ns for u in others}
    broken.write_bytes(Path(world["files"][2]).read_bytes())  # the retry reads it whole
    again = decontaminate(files, out, world["evals"], cfg(1), world["prev"])  # resumes with another fan-out
    assert again["n_input"] == sum(SIZES[f] for f in lost)  # only the unfinished files were decided
    assert {u: (ldir / f"part-{u}.parquet").stat().st_mtime_ns for u in others} == before
    clean = tmp_path / "clean"
    decontaminate(world["files"], clean, world["evals"], cfg(2), world["prev"])
    a, b = outputs(out), outputs(clean)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_reduce_reads_parts_not_embeddings(ray_local, world, tmp_path, monkeypatch, workers):
    """Re-run over finished files (1 worker: the in-process run visits them; 2 workers: the driver visits every
    file after the pool): the driver reads the eval sets and the mining parts, never a training file."""
    out = tmp_path / "dc"
    decontaminate(world["files"], out, world["evals"], cfg(workers), world["prev"])
    first = outputs(out)
    (step_dir(out, "decontam") / "part-shard-000004.parquet").unlink()  # one file left to decide
    read, tables = [], []
    real_read, real_table = mining.read_embeddings, mining.pq.read_table
    monkeypatch.setattr(mining, "read_embeddings", lambda p, *a, **k: read.append(str(p)) or real_read(p, *a, **k))
    monkeypatch.setattr(mining.pq, "read_table", lambda p, *a, **k: tables.append(str(p)) or real_table(p, *a, **k))
    decontaminate(world["files"], out, world["evals"], cfg(workers), world["prev"])
    train = [f for f in read if f in world["files"]]
    # in-process, the one undecided file is read by its own `process`; with 2 workers by an actor
    assert train == ([world["files"][4]] if workers == 1 else [])
    assert set(read) - set(train) == set(world["evals"].values())
    parts = {str(out / MINING_PARTS / f"part-shard-{f:06d}.parquet") for f in range(len(SIZES))}
    assert parts <= set(tables) and not set(tables) & set(world["files"])
    assert outputs(out) == first



@pytest.mark.parametrize("workers", [1, 2])
def test_the_driver_merges_each_part_as_its_unit_is_announced(ray_local, world, tmp_path, monkeypatch, workers):
    """The mining merge is not a serial pass after the workers: the driver feeds it every leading unit as the
    unit is announced, so `finish` starts with every part merged (and the bytes are those of the streamed pass)."""
    at_finish = []
    real_finish = mining.DecontamStep.finish

    def finish(self, n_units):
        at_finish.append((self._merged, n_units))
        return real_finish(self, n_units)

    opened = []  # was the merge open (eval sets loaded) when the unit was announced?
    real_published = mining.DecontamStep.unit_published

    def published(self, name):
        opened.append(self._merge is not None)
        return real_published(self, name)

    monkeypatch.setattr(mining.DecontamStep, "finish", finish)
    monkeypatch.setattr(mining.DecontamStep, "unit_published", published)
    out = tmp_path / "dc"
    decontaminate(world["files"], out, world["evals"], cfg(workers), world["prev"])
    assert at_finish == [(len(SIZES), len(SIZES))]
    # 2 workers: the driver opened it while the actors started (`prepare_reduce`); in-process: at the first unit
    assert opened == [workers == 2] + [True] * (len(SIZES) - 1)
    ref = streamed_mining(world, tmp_path / "ref")
    assert all(outputs(out)[k] == v for k, v in ref.items())

def test_lost_mining_part_of_a_finished_file_is_rebuilt(world, tmp_path, caplog):
    out = tmp_path / "dc"
    decontaminate(world["files"], out, world["evals"], cfg(1), world["prev"])
    first = outputs(out)
    (out / MINING_PARTS / "part-shard-000001.parquet").unlink()
    with caplog.at_level(logging.WARNING, logger=mining.__name__):
        again = decontaminate(world["files"], out, world["evals"], cfg(1), world["prev"])
    assert again["n_input"] == 0 and "shard-000001 is finished but its mining part is gone" in caplog.text
    assert outputs(out) == first


def test_fanout_is_not_part_of_the_stamp(world, tmp_path):
    """A scheduling field: the step folder resumes under another fan-out (the failed-file test resumes a
    2-worker folder with 1 worker)."""
    from core.foundation.step import read_stamp

    out = tmp_path / "dc"
    decontaminate(world["files"], out, world["evals"], cfg(1), world["prev"])
    config = read_stamp(step_dir(out, "decontam"))["config"]
    assert "fanout" not in config and config["k"] == K


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_worker_decides_without_importing_torch(world, tmp_path, device):
    """A decontam worker on a CPU faiss build (each fan-out actor, and the reduce) never imports torch to learn
    there is no GPU: ~2 s of CPU per worker process, which the fan-out would pay once per actor."""
    import json
    import subprocess
    import sys

    code = f"""
import json, sys
from core.runs.fanout import FanOut
from core.steps.dedup.config import DecontamConfig
from core.steps.dedup.mining import decontaminate
cfg = DecontamConfig(threshold=0.95, k=2, device={device!r}, fanout=FanOut(workers=1))
counts = decontaminate({json.dumps(world["files"])}, {str(tmp_path / "out")!r}, {json.dumps(world["evals"])}, cfg)
print(json.dumps({{"torch": "torch" in sys.modules, "n": counts["n_input"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] > 0 and got["torch"] is False, got


def test_the_merge_takes_parts_with_plain_or_dictionary_strings(world, tmp_path):
    """`read_part` hands the merge dictionary codes (no per-row string); a part read plainly merges to the same
    table, also when it comes in several chunks (here: batches of 7 rows)."""
    out = tmp_path / "dc"
    decontaminate(world["files"], out, world["evals"], cfg(1), world["prev"])
    eval_ids = {b: read_embeddings(p, "image").ids for b, p in world["evals"].items()}
    parts = [out / MINING_PARTS / f"part-shard-{f:06d}.parquet" for f in range(len(SIZES))]
    results = []
    for read in (mining.read_part, pq.read_table):
        merge = mining.MiningMerge(eval_ids, K)
        for p in parts:
            t = read(p)
            merge.add(pa.Table.from_batches(t.to_batches(max_chunksize=7), t.schema) if t.num_rows else t, p.stem)
        results.append({b: merge.result(b) for b in eval_ids})
    for b in eval_ids:
        assert results[0][b].equals(results[1][b])
        assert results[0][b].equals(pq.read_table(out / "mining" / f"{b}.parquet"))
