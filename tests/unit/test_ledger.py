import pytest

from core.foundation.ledger import LedgerError, LedgerWriter, check_balance, passing_ids, read_ledger, step_dir


def write(run, step, rows):
    with LedgerWriter(step_dir(run, step) / "part-0.parquet", step) as led:
        for sid, decision, reason in rows:
            led.add(sid, decision, reason, score=0.5, cluster=3)


def test_balance_across_steps(tmp_path):
    write(tmp_path, "ingest", [("a", "keep", ""), ("b", "keep", ""), ("c", "quarantine", "corrupt_image")])
    write(tmp_path, "dedup", [("a", "keep", ""), ("b", "drop", "semdedup")])
    bal = check_balance(tmp_path, ["ingest", "dedup"], inputs=["a", "b", "c"])
    assert [(b.step, b.inputs, b.kept, b.dropped, b.quarantined) for b in bal] == [
        ("ingest", 3, 2, 0, 1), ("dedup", 2, 1, 1, 0)]
    df = read_ledger(step_dir(tmp_path, "dedup"))
    assert passing_ids(df) == ["a"] and df["extra"].iloc[0] == '{"cluster": 3}'


def test_balance_detects_missing_and_unknown(tmp_path):
    write(tmp_path, "ingest", [("a", "keep", ""), ("b", "keep", "")])
    write(tmp_path, "dedup", [("a", "keep", ""), ("zzz", "keep", "")])
    with pytest.raises(LedgerError, match="1 inputs without a decision"):
        check_balance(tmp_path, ["ingest", "dedup"])


def test_balance_across_step_output_dirs(tmp_path):
    write(tmp_path / "s1", "ingest", [("a", "keep", "")])
    write(tmp_path / "s2", "embed", [("a", "keep", "")])
    assert len(check_balance([tmp_path / "s1", tmp_path / "s2"], ["ingest", "embed"])) == 2
    with pytest.raises(LedgerError, match="no ledger"):
        check_balance([tmp_path / "s1"], ["ingest", "embed"])


def test_writer_refuses_double_decisions_and_reasonless_drops(tmp_path):
    led = LedgerWriter(tmp_path / "x.parquet", "s")
    led.add("a", "keep")
    with pytest.raises(ValueError, match="already decided"):
        led.add("a", "drop", "x")
    with pytest.raises(ValueError, match="needs a reason"):
        led.add("b", "drop")
    with pytest.raises(ValueError, match="decision"):
        led.add("c", "maybe")
    led.close()
    assert len(read_ledger(tmp_path / "x.parquet")) == 1


def test_failed_writer_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with LedgerWriter(tmp_path / "y.parquet", "s", flush_every=1) as led:
            led.add("a", "keep")
            raise RuntimeError("crash mid-shard")
    assert not (tmp_path / "y.parquet").exists() and not list(tmp_path.glob("*.tmp"))


def test_read_ledger_reads_only_the_columns_asked(tmp_path):
    """A reduce that needs ids (the missing-id pass, `Passing.read`) reads those columns, not every `detail` and
    `extra` string of the step."""
    from core.foundation.ledger import LedgerWriter, read_ledger

    d = tmp_path / "ledger" / "s"
    with LedgerWriter(d / "part-a.parquet", "s") as led:
        led.add("x", "keep", "", 0.5, "sh0", note="a long detail")
        led.add("y", "drop", "why", None, "sh0")
    df = read_ledger(d, columns=["sample_id", "decision"])
    assert list(df.columns) == ["sample_id", "decision"] and df.values.tolist() == [["x", "keep"], ["y", "drop"]]
    (tmp_path / "empty").mkdir()
    assert list(read_ledger(tmp_path / "empty", columns=["sample_id"]).columns) == ["sample_id"]
    with pytest.raises(ValueError, match="unknown ledger columns"):
        read_ledger(d, columns=["sample_id", "nope"])
