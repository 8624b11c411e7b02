"""The streamed run summary (core/runs/ledger_stream.py + write_run_summary): the same files as the in-memory pandas
summary it replaced (byte for byte where the contract says so), the same balance proof with many id buckets,
the merged ledger as a dataset partitioned by step, and nothing written when a check fails."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from core.foundation.ledger import LedgerError, LedgerWriter, check_balance, read_ledger, step_dir
from core.runs.ledger_stream import id_buckets, merge_run_ledgers
from core.runs.summary import write_run_summary
from tasks.types import StepOut

ROOT = Path(__file__).resolve().parents[2]


def _old_summary():
    """The in-memory summary as it was (kept in the benchmark that measures it against the streamed one)."""
    spec = importlib.util.spec_from_file_location("summary_memory", ROOT / "benchmarks" / "summary_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.old_write_run_summary


def _part(run: Path, step: str, name: str, rows: list[tuple]) -> None:
    with LedgerWriter(step_dir(run, step) / f"{name}.parquet", step) as led:
        for sid, decision, reason, score, extra in rows:
            led.add(sid, decision, reason, score=score, shard=f"shard-{name}", **extra)


def _run(root: Path, n: int = 300, seed: int = 0) -> tuple[list[Path], list[str]]:
    """Three steps in separate output folders, several parts each, an empty part, NaN scores, reasons with a
    detail suffix, JSON extras, and ingest's source accounting."""
    rng = np.random.default_rng(seed)
    ing, mid, last = root / "ingest", root / "dedup", root / "ppl"
    ids = [f"s{i:04d}" if i % 7 else f"img/{uuid.UUID(int=i)}" for i in range(n)]
    dec = ["quarantine" if rng.random() < 0.1 else "keep" for _ in ids]
    _part(ing, "ingest", "part-ingest", [(i, d, "corrupt_image" if d == "quarantine" else "", None,
                                          {"detail": "bad"} if d == "quarantine" else {}) for i, d in zip(ids, dec)])
    acc = {"source_records": n, "ledger_rows": n, "kept": dec.count("keep"), "quarantined": dec.count("quarantine"),
           "files": [{"file": "d.json", "source_records": n, "ledger_rows": n}], "balanced": True}
    (step_dir(ing, "ingest") / "source_accounting.json").write_text(json.dumps(acc))
    passed = [i for i, d in zip(ids, dec) if d == "keep"]
    rows, out = [], []
    for k, sid in enumerate(passed):
        d = "drop" if k % 9 == 0 else "keep"
        rows.append((sid, d, "semdedup_eps" if d == "drop" else "", float("nan") if k % 11 == 0 else k / 3,
                     {"cluster": k % 5}))
        if d == "keep":
            out.append(sid)
    for j in range(0, len(rows), 40):
        _part(mid, "semdedup", f"part-{j:05d}", rows[j:j + 40])
    _part(mid, "semdedup", "part-empty", [])
    third = [(sid, "modify" if k % 2 else ("drop" if k % 13 == 0 else "keep"), "ppl_above_p90" if k % 26 == 0 else "",
              float(k), {}) for k, sid in enumerate(out)]
    for j in range(0, len(third), 70):
        _part(last, "perplexity", f"part-{j:05d}", third[j:j + 70])
    return [ing, mid, last], [ids[3], ids[7], passed[0], "never-seen"]


STEPS = ["ingest", "semdedup", "perplexity"]


@pytest.mark.parametrize("buckets", ["one", "many"])
def test_streamed_summary_files_are_byte_identical_to_the_pandas_summary(tmp_path, buckets, monkeypatch):
    dirs, bad = _run(tmp_path / "run")
    if buckets == "many":  # tiny buckets and batches: the proof and the counts run over many pieces
        import core.runs.ledger_stream as ls

        monkeypatch.setattr(ls, "BUCKET_ROWS", 16)
        monkeypatch.setattr(ls, "BATCH_ROWS", 25)
    _old_summary()([str(d) for d in dirs], STEPS, str(tmp_path / "old"), bad)
    rep = write_run_summary([str(d) for d in dirs], STEPS, str(tmp_path / "new"), bad)
    for f in ("ledger.parquet", "counts.parquet", "summary.json"):
        assert (tmp_path / "new" / f).read_bytes() == (tmp_path / "old" / f).read_bytes(), f
    assert rep.summary["known_bad"]["per_step"][0]["absent"] == 1
    # the merged dataset, partitioned by step, holds the same rows as the single file
    merged = ds.dataset(tmp_path / "new" / "ledger", format="parquet").to_table().to_pandas()
    assert sorted(p.name for p in (tmp_path / "new" / "ledger").iterdir()) == sorted(STEPS)
    single = pd.read_parquet(tmp_path / "new" / "ledger.parquet")
    key = ["step", "sample_id"]
    pd.testing.assert_frame_equal(merged.sort_values(key).reset_index(drop=True),
                                  single.sort_values(key).reset_index(drop=True))
    assert not list((tmp_path / "new").glob(".summary-*"))  # the staging folder is gone


def test_all_quarantined_run_is_byte_identical_too(tmp_path):
    run = tmp_path / "run"
    _part(run, "ingest", "part-ingest", [(f"b{i}", "quarantine", "missing_image", None, {}) for i in range(4)])
    _part(run, "embed", "part-empty", [])
    _old_summary()([str(run)], ["ingest", "embed"], str(tmp_path / "old"))
    write_run_summary([str(run)], ["ingest", "embed"], str(tmp_path / "new"))
    for f in ("ledger.parquet", "counts.parquet", "summary.json"):
        assert (tmp_path / "new" / f).read_bytes() == (tmp_path / "old" / f).read_bytes(), f


def _balance_error(fn) -> str:
    with pytest.raises(LedgerError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("fault", ["duplicate", "missing", "unknown"])
def test_bucketed_proof_raises_what_check_balance_raises(tmp_path, fault):
    run = tmp_path / "run"
    ids = [f"id{i:03d}" for i in range(200)]
    _part(run, "ingest", "part-ingest", [(i, "keep", "", None, {}) for i in ids])
    second = ids[:-3] if fault == "missing" else ids + (["zz1", "zz0"] if fault == "unknown" else [])
    rows = [(i, "keep", "", None, {}) for i in second]
    for j in range(0, len(rows), 30):
        _part(run, "embed", f"part-{j:03d}", rows[j:j + 30])
    if fault == "duplicate":  # in another part file: LedgerWriter itself refuses a second decision in one part
        _part(run, "embed", "part-zz", [("id040", "drop", "again", None, {})])
    expected = _balance_error(lambda: check_balance(run, ["ingest", "embed"]))
    got = _balance_error(lambda: merge_run_ledgers(run, ["ingest", "embed"], tmp_path, bucket_rows=8, batch_rows=17))
    assert got == expected


def test_nothing_is_written_when_the_balance_fails(tmp_path):
    run = tmp_path / "run"
    _part(run, "ingest", "part-ingest", [("a", "keep", "", None, {}), ("b", "keep", "", None, {})])
    _part(run, "embed", "part-0", [("a", "keep", "", None, {})])
    with pytest.raises(LedgerError, match="1 inputs without a decision"):
        write_run_summary([str(run)], ["ingest", "embed"], str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_big_runs_get_the_dataset_only(tmp_path):
    """Above the single-file limit only `ledger/<step>/part-*.parquet` is written (parts of bounded size), and
    an older run's ledger.parquet in the same folder is removed rather than left to mislead."""
    dirs, _ = _run(tmp_path / "run")
    staging = tmp_path / "staging"
    staging.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.parquet").write_bytes(b"stale")
    merged = merge_run_ledgers(dirs, STEPS, staging, single_file_max_rows=100)
    merged.publish(out)
    assert not (out / "ledger.parquet").exists()
    table = ds.dataset(out / "ledger", format="parquet").to_table()
    assert table.num_rows == sum(b.inputs for b in merged.balance)
    assert [b.as_dict() for b in merged.balance] == [b.as_dict() for b in check_balance(dirs, STEPS)]


def test_id_buckets_are_stable_and_even():
    kinds = {
        "numbers": [f"{i:08d}" for i in range(20_000)],
        "paths": [f"coco/train2017/{i:012d}.jpg" for i in range(20_000)],
        "middle": [f"ai2d-{i}-question-about-the-diagram" for i in range(20_000)],
        "uuids": [str(uuid.UUID(int=i * 7919)) for i in range(20_000)],
    }
    for name, ids in kinds.items():
        arr = pa.array(ids)
        b = id_buckets(arr, 16)
        counts = np.bincount(b, minlength=16)
        assert counts.max() < 1.3 * counts.mean(), (name, counts)  # even: no bucket holds much more than its share
        # the same id gets the same bucket whatever array, slice or string type it comes in
        assert (id_buckets(arr.slice(100, 500), 16) == b[100:600]).all()
        assert (id_buckets(arr.cast(pa.large_string()), 16) == b).all()
        assert (id_buckets(pa.array(ids[::-1]), 16) == b[::-1]).all()


def test_publishing_again_into_the_same_folder_leaves_no_step_of_the_earlier_run(tmp_path):
    from flytekit.types.directory import FlyteDirectory

    from tasks.run_report import summarize_run

    dirs, _ = _run(tmp_path / "run")
    out = tmp_path / "published"
    summarize_run(steps=[StepOut(s, FlyteDirectory(str(d))) for s, d in zip(STEPS, dirs)], output_dir=str(out))
    assert sorted(p.name for p in (out / "ledger").iterdir()) == sorted(STEPS)
    summarize_run(steps=[StepOut(s, FlyteDirectory(str(d))) for s, d in zip(STEPS[:2], dirs[:2])], output_dir=str(out))
    assert sorted(p.name for p in (out / "ledger").iterdir()) == sorted(STEPS[:2])
    assert set(read_ledger(out / "ledger")["step"]) == set(read_ledger(out / "ledger.parquet")["step"]) == set(STEPS[:2])
