"""core/foundation/step.py: the shard-step contract (resume, one ledger per unit, missing ids, atomic publish)."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pytest

from core.foundation.ledger import LedgerWriter, check_balance, read_ledger
from core.foundation.sample import Sample, Turn
from core.foundation.step import Passing, ShardStep, shards_of, write_atomic, write_json_atomic, write_parquet_atomic
from core.io.wds import write_shards


def samples(n: int, start: int = 0) -> list[Sample]:
    return [Sample(f"s{i:03d}", [Turn("human", f"question {i}?"), Turn("gpt", "x" * (i % 7 + 1))])
            for i in range(start, start + n)]


class Lengths(ShardStep):
    """A toy step: keep short answers, drop long ones; counts how often setup ran and what it saw."""

    name = "lengths"

    def __init__(self, out, prev=None, fail_on: str = ""):
        super().__init__(out, prev)
        self.setups = 0
        self.fail_on = fail_on
        self.visited: list[str] = []

    def setup(self) -> None:
        self.setups += 1

    def process(self, unit, led):
        n = 0
        for s in self.read(unit, led):
            if s.id == self.fail_on:
                raise RuntimeError("crash in the middle of a unit")
            n_chars = len(s.conversations[-1].value)
            led.add(s.id, "keep" if n_chars <= 4 else "drop", "" if n_chars <= 4 else "too_long",
                    score=n_chars, shard=unit.name)
            n += 1
        write_json_atomic({"n": n}, self.out / "lengths" / f"{unit.name}.json")
        return n

    def visit_finished(self, unit) -> None:
        self.visited.append(unit.name)


@pytest.fixture
def run(tmp_path):
    """A run folder with three shards of 10 samples and an ingest ledger passing all but s005."""
    write_shards(samples(30), str(tmp_path / "run" / "shards"), max_samples=10)
    with LedgerWriter(tmp_path / "run" / "ledger" / "ingest" / "part-0.parquet", "ingest") as led:
        for s in samples(30):
            shard = f"shard-{int(s.id[1:]) // 10:06d}"
            led.add(s.id, "quarantine" if s.id == "s005" else "keep", "bad" if s.id == "s005" else "", shard=shard)
    return tmp_path / "run"


def test_run_decides_each_passing_id_once_and_balances(run, tmp_path):
    prev = Passing.read(run, "ingest")
    assert len(prev) == 29 and "s005" not in prev and prev.in_shard("shard-000000") == {f"s{i:03d}" for i in range(10)} - {"s005"}
    out = tmp_path / "out"
    summary = Lengths(out, prev).run(shards_of(run))
    assert summary.done == ["shard-000000", "shard-000001", "shard-000002"] and summary.skipped == []
    led = read_ledger(out / "ledger" / "lengths")
    assert sorted(led.sample_id) == sorted(prev.ids)
    assert summary.counts["keep"] + summary.counts["drop"] == 29 and summary.reasons == {"too_long": summary.counts["drop"]}
    check_balance([run, out], ["ingest", "lengths"])
    assert (out / "lengths" / "shard-000001.json").read_text() == '{"n": 10}'


def test_finished_units_are_skipped_and_setup_runs_only_when_needed(run, tmp_path):
    out = tmp_path / "out"
    Lengths(out, Passing.read(run, "ingest")).run(shards_of(run))
    again = Lengths(out, Passing.read(run, "ingest"))
    s = again.run(shards_of(run))
    assert s.done == [] and len(s.skipped) == 3 and again.setups == 0 and again.visited == s.skipped
    assert len(read_ledger(out / "ledger" / "lengths")) == 29  # nothing decided twice, no missing part


def test_a_crash_leaves_the_unit_absent_and_a_rerun_resumes_it(run, tmp_path):
    out = tmp_path / "out"
    step = Lengths(out, Passing.read(run, "ingest"), fail_on="s015")
    with pytest.raises(RuntimeError):
        step.run(shards_of(run))
    parts = sorted(p.name for p in (out / "ledger" / "lengths").iterdir())
    # the crashed unit left no part and no temp file; the writer lock is released (its file removed)
    assert parts == ["_step.json", "part-shard-000000.parquet"]
    s = Lengths(out, Passing.read(run, "ingest")).run(shards_of(run))
    assert s.skipped == ["shard-000000"] and s.done == ["shard-000001", "shard-000002"]
    assert len(read_ledger(out / "ledger" / "lengths")) == 29


def test_ids_in_no_unit_are_quarantined_not_lost(run, tmp_path):
    prev = Passing(step="ingest", by_shard={"shard-000000": ["s001", "ghost1"], "elsewhere": ["ghost2"]})
    out = tmp_path / "out"
    s = Lengths(out, prev).run(shards_of(run))
    led = read_ledger(out / "ledger" / "lengths").set_index("sample_id")
    assert s.missing == 2 and set(led.index) == {"s001", "ghost1", "ghost2"}
    assert list(led.loc[["ghost1", "ghost2"], "reason"]) == ["missing_from_shard"] * 2
    assert (out / "ledger" / "lengths" / "part-zz-missing.parquet").exists()


def test_reader_quarantines_go_to_the_units_ledger(tmp_path):
    shards = tmp_path / "shards"
    write_shards(samples(3), str(shards))
    bad = shards / "shard-000001.tar"
    with tarfile.open(bad, "w") as tar:
        data = b'{"id": "broken", "conversations": ['
        ti = tarfile.TarInfo("broken.json")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    s = Lengths(tmp_path / "out").run(shards_of(shards))
    led = read_ledger(tmp_path / "out" / "ledger" / "lengths")
    assert led[led.sample_id.str.endswith("broken")].reason.tolist() == ["invalid_json"]
    assert s.counts["quarantine"] == 1 and s.done == ["shard-000000", "shard-000001"]


def test_no_units_still_writes_a_ledger(tmp_path):
    s = Lengths(tmp_path / "out").run([])
    assert s.n_units == 0 and (tmp_path / "out" / "ledger" / "lengths" / "part-empty.parquet").exists()


def test_two_inputs_with_one_name_are_refused(tmp_path):
    with pytest.raises(ValueError, match="share a unit name"):
        Lengths(tmp_path / "out").run(["a/shard-000000.tar", "b/shard-000000.tar"])


def test_a_step_without_name_is_refused(tmp_path):
    class Nameless(ShardStep):
        pass

    with pytest.raises(TypeError, match="name"):
        Nameless(tmp_path)


def test_shards_of_tells_a_run_from_a_shard_folder(run):
    assert shards_of(run) == shards_of(run / "shards")
    assert [u.rsplit("/", 1)[1] for u in shards_of(str(run / "shards" / "shard-*.tar"))] == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"] == [u.rsplit("/", 1)[1] for u in shards_of(run)]


def test_passing_read_without_step_is_none_and_of_keeps_order(run):
    assert Passing.read(run, "") is None and Passing.read(None, "ingest") is None
    p = Passing.of(["b", "a", "b"])
    assert list(p.by_shard[""]) == ["b", "a"] and len(p) == 2


def test_atomic_writes_replace_whole_files(tmp_path):
    write_atomic(tmp_path / "d" / "x.txt", "one")
    write_atomic(tmp_path / "d" / "x.txt", b"two")
    write_parquet_atomic(pa.table({"a": [1, 2]}), tmp_path / "d" / "t.parquet")
    assert (tmp_path / "d" / "x.txt").read_text() == "two"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["t.parquet", "x.txt"]  # no temp files left


def test_the_ten_line_example_of_docs_architecture_runs(run, tmp_path):
    """docs/architecture.md's "Adding a step" block is real code: run it on a run folder with a semdedup ledger."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    block = re.search(r"### Adding a step.*?```python\n(.*?)```", doc, re.S).group(1)
    assert len(block.strip().splitlines()) <= 10
    (run / "ledger" / "ingest").rename(run / "ledger" / "semdedup")
    for p in (run / "ledger" / "semdedup").glob("*.parquet"):  # the parts carry their step name: rewrite it
        df = read_ledger(p).assign(step="semdedup")
        with LedgerWriter(p, "semdedup") as led:
            for r in df.itertuples():
                led.add(r.sample_id, r.decision, r.reason, shard=r.shard)
    ns = {"out": tmp_path / "out", "prev_dir": run, "run": run}
    exec(block, ns)
    led = read_ledger(tmp_path / "out" / "ledger" / "answer_len")
    assert len(led) == 29 and set(led.decision) == {"keep"}
    check_balance([run, tmp_path / "out"], ["semdedup", "answer_len"])
