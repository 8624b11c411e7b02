"""core/runs/fanout.py: per-shard steps over a Ray actor pool give what the sequential run gives.

One local Ray (2 CPUs) for the module; each fan-out runs 2 actors over groups of 2 units."""

from __future__ import annotations

import io
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppl_helpers import clean_records, garbled_records, tiny_lm  # noqa: E402
from ppl_helpers import samples as ppl_samples  # noqa: E402

from core.foundation.ledger import read_ledger, step_dir  # noqa: E402
from core.foundation.sample import Sample, Turn  # noqa: E402
from core.foundation.step import MISSING_PART, Passing, ShardStep, write_json_atomic  # noqa: E402
from core.io.wds import list_shards, write_shards  # noqa: E402
from core.runs.fanout import FanOut, FanOutIncomplete, StepSpec, groups_of, run_fanout, run_sharded  # noqa: E402


class Lengths(ShardStep):
    """A toy step: keep short answers, drop long ones, publish a per-unit JSON; `marks` gets one file per
    finished `process` call (unit name + process id), `crash_on` kills the process once, mid-unit."""

    name = "lengths"

    def __init__(self, out, prev=None, marks: str = "", crash_on: str = "", fail_on: str = ""):
        super().__init__(out, prev)
        self.marks, self.crash_on, self.fail_on = marks, crash_on, fail_on

    def process(self, unit, led):
        n = 0
        for s in self.read(unit, led):
            if s.id == self.fail_on:
                raise RuntimeError(f"bad sample {s.id}")
            if s.id == self.crash_on and not os.path.exists(f"{self.marks}/crashed"):
                Path(f"{self.marks}/crashed").write_text(str(os.getpid()))
                os._exit(1)  # the actor's process dies in the middle of the unit
            n_chars = len(s.conversations[-1].value)
            led.add(s.id, "keep" if n_chars <= 4 else "drop", "" if n_chars <= 4 else "too_long",
                    score=n_chars, shard=unit.name)
            n += 1
        write_json_atomic({"n": n}, self.out / "lengths" / f"{unit.name}.json")
        if self.marks:
            Path(f"{self.marks}/{unit.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}").touch()
        return n


@pytest.fixture(scope="module")
def ray_local():
    import ray
    from ray import cloudpickle

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def texts(n: int) -> list[Sample]:
    return [Sample(f"s{i:03d}", [Turn("human", f"question {i}?"), Turn("gpt", "x" * (i % 7 + 1))]) for i in range(n)]


@pytest.fixture
def shards(tmp_path):
    """Five shards of 6 samples."""
    write_shards(texts(30), str(tmp_path / "shards"), max_samples=6)
    return list_shards(str(tmp_path / "shards"))


def passing(drop: str = "s005", extra: tuple[str, ...] = ("ghost",)) -> Passing:
    """All ids but `drop`, by shard, plus ids that no shard holds (the reduce quarantines them)."""
    by: dict[str, list[str]] = {}
    for s in texts(30):
        if s.id != drop:
            by.setdefault(f"shard-{int(s.id[1:]) // 6:06d}", []).append(s.id)
    by["shard-000099"] = list(extra)
    return Passing("ingest", by)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path (bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def marks_of(folder: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in folder.iterdir():
        if p.name != "crashed":
            out[p.name.split(".")[0]] = out.get(p.name.split(".")[0], 0) + 1
    return out


def test_groups_and_presets():
    assert groups_of(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert FanOut.from_json('{"workers": 3}').workers == 3
    with pytest.raises(ValueError):
        FanOut(workers=0)


def test_two_workers_equal_sequential_and_missing_once(ray_local, shards, tmp_path):
    prev = passing()
    seq = run_sharded(StepSpec(Lengths, (tmp_path / "seq",), {"prev": prev}), shards, workers=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    par = run_sharded(StepSpec(Lengths, (tmp_path / "par",), {"prev": prev, "marks": str(marks)}), shards,
                      workers=2, group_size=2)
    assert tree(tmp_path / "seq") == tree(tmp_path / "par")  # same ledger parts, artifacts and stamp, byte for byte
    assert sorted(par.done) == sorted(seq.done) and len(par.done) == 5
    assert par.counts == seq.counts and par.reasons == seq.reasons and par.results == seq.results
    pids = {p.name.split(".")[1] for p in marks.iterdir()}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two actors did the work, not the driver
    # the reduce ran once, on the driver: one missing part, the ghost quarantined once
    assert par.missing == 1 == seq.missing
    led = read_ledger(step_dir(tmp_path / "par", "lengths"))
    assert len(list(step_dir(tmp_path / "par", "lengths").glob(f"{MISSING_PART}*.parquet"))) == 1
    assert led.sample_id.is_unique and set(led.sample_id) == prev.ids
    assert led.set_index("sample_id").loc["ghost", "reason"] == "missing_from_shard"


def test_actors_units_are_announced_to_the_drivers_listeners(ray_local, shards, tmp_path):
    """A task's step folder on an object store pushes each unit as it is announced (tasks/paths.py StepFolder):
    units finished by actors are announced in the driver, each once, with its ledger part already there."""
    from core.foundation.step import on_unit_published

    seen: list[str] = []

    def heard(step, name):
        assert step.is_done(name)
        seen.append(name)

    with on_unit_published(heard):
        s = run_sharded(StepSpec(Lengths, (tmp_path / "par",), {}), shards, workers=2, group_size=2)
    assert sorted(seen) == sorted(s.done) and len(seen) == 5


def test_unit_with_ledger_part_is_skipped(ray_local, shards, tmp_path):
    out = tmp_path / "run"
    step = Lengths(out)
    with step.writing():  # two units finished earlier (a crashed run), no reduce yet
        step.process_units(shards[:2])
    (out / "lengths" / "shard-000000.json").write_text("sentinel")  # proves the unit is not redone
    marks = tmp_path / "marks"
    marks.mkdir()
    s = run_sharded(StepSpec(Lengths, (out,), {"marks": str(marks)}), shards, workers=2, group_size=2)
    assert sorted(s.skipped) == ["shard-000000", "shard-000001"]
    assert sorted(s.done) == ["shard-000002", "shard-000003", "shard-000004"]
    assert marks_of(marks) == {"shard-000002": 1, "shard-000003": 1, "shard-000004": 1}
    assert (out / "lengths" / "shard-000000.json").read_text() == "sentinel"
    assert read_ledger(step_dir(out, "lengths")).sample_id.is_unique


def test_actor_crash_mid_unit_is_retried_unit_once(ray_local, shards, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # s009 is in shard-000001, the second unit of the first group: shard-000000 is published before the crash
    spec = StepSpec(Lengths, (tmp_path / "run",), {"prev": passing(), "marks": str(marks), "crash_on": "s009"})
    s = run_sharded(spec, shards, workers=2, group_size=2, max_restarts=1, max_task_retries=1)
    assert (marks / "crashed").exists()  # the actor did die
    assert marks_of(marks) == {f"shard-{i:06d}": 1 for i in range(5)}  # every unit finished exactly once
    assert "shard-000000" in s.skipped  # the retried group skipped the unit published before the crash
    led = read_ledger(step_dir(tmp_path / "run", "lengths"))
    assert led.sample_id.is_unique and set(led.sample_id) == passing().ids
    seq = run_sharded(StepSpec(Lengths, (tmp_path / "seq",), {"prev": passing()}), shards, workers=1)
    assert tree(tmp_path / "seq") == tree(tmp_path / "run")
    assert s.missing == seq.missing == 1



def test_an_actor_lost_for_good_leaves_its_groups_to_the_others(ray_local, shards, tmp_path):
    """No restart left (max_restarts=0): the actor that dies mid-unit is gone with the groups queued on it; they go
    once more to the other actor, which skips the unit published before the crash and finishes the rest."""
    marks = tmp_path / "marks"
    marks.mkdir()
    spec = StepSpec(Lengths, (tmp_path / "run",), {"prev": passing(), "marks": str(marks), "crash_on": "s009"})
    s = run_sharded(spec, shards, workers=2, group_size=2, max_restarts=0, max_task_retries=0)
    assert (marks / "crashed").exists()
    assert marks_of(marks) == {f"shard-{i:06d}": 1 for i in range(5)}  # every unit finished exactly once
    assert "shard-000000" in s.skipped
    seq = run_sharded(StepSpec(Lengths, (tmp_path / "seq",), {"prev": passing()}), shards, workers=1)
    assert tree(tmp_path / "seq") == tree(tmp_path / "run") and s.missing == seq.missing == 1


class SlowStart(Lengths):
    """`Lengths` whose first actor to build it (it creates `flag`, holding its process id) takes `slow` seconds to
    start: a GPU node still joining the cluster."""

    def __init__(self, out, prev=None, marks: str = "", flag: str = "", slow: float = 0.0):
        super().__init__(out, prev, marks)
        import ray

        if not slow or ray.get_runtime_context().get_actor_id() is None:  # the driver's copy starts at once
            return
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(slow)


def test_a_started_actor_works_without_waiting_for_a_slow_one(ray_local, shards, tmp_path):
    """Each actor gets groups as soon as it has started: one that takes 60 s to start holds nobody back (the
    old driver waited for every actor before handing out any group, then gave the slow one its share)."""
    marks, flag = tmp_path / "marks", tmp_path / "slow.pid"
    marks.mkdir()
    spec = StepSpec(SlowStart, (tmp_path / "run",), {"prev": passing(), "marks": str(marks), "flag": str(flag),
                                                     "slow": 60.0})
    s = run_sharded(spec, shards, workers=2, group_size=1)
    slow_pid = flag.read_text()
    assert slow_pid and len(s.done) == 5 and s.missing == 1
    assert marks_of(marks) == {f"shard-{i:06d}": 1 for i in range(5)}
    assert not [p.name for p in marks.iterdir() if p.name.split(".")[1] == slow_pid]  # the slow one did none
    run_sharded(StepSpec(Lengths, (tmp_path / "seq",), {"prev": passing()}), shards, workers=1)
    assert tree(tmp_path / "seq") == tree(tmp_path / "run")


class Prepared(Lengths):
    """`Lengths` whose driver records when it loads its reduce (`fail_on="prepare"`: the loading raises)."""

    calls: list = []  # (process id, ledger parts on disk then), in the driver's process

    def prepare_reduce(self):
        Prepared.calls.append((os.getpid(), sorted(p.name for p in self.ledger_dir.glob("*.parquet"))))
        if self.fail_on == "prepare":
            raise RuntimeError("eval set unreadable")


def test_the_driver_loads_its_reduce_once_while_the_actors_start(ray_local, shards, tmp_path):
    """`prepare_reduce` runs once, on the driver, before any unit is processed; if it raises, the run stops there
    (no unit decided, the actors killed); an in-process run never calls it (its reduce loads lazily)."""
    Prepared.calls.clear()
    s = run_sharded(StepSpec(Prepared, (tmp_path / "run",), {"prev": passing()}), shards, workers=2, group_size=1)
    assert Prepared.calls == [(os.getpid(), [])] and len(s.done) == 5 and s.missing == 1
    Prepared.calls.clear()
    run_sharded(StepSpec(Prepared, (tmp_path / "seq",), {"prev": passing()}), shards, workers=1)
    assert Prepared.calls == []
    out = tmp_path / "bad"
    with pytest.raises(RuntimeError, match="eval set unreadable"):
        run_sharded(StepSpec(Prepared, (out,), {"fail_on": "prepare"}), shards, workers=2, group_size=1)
    assert Prepared.calls == [(os.getpid(), [])] and not list(step_dir(out, "lengths").glob("*.parquet"))


def test_failing_unit_leaves_others_published_and_no_reduce(ray_local, shards, tmp_path):
    out = tmp_path / "run"
    spec = StepSpec(Lengths, (out,), {"prev": passing(), "fail_on": "s020"})  # in shard-000003
    with pytest.raises(FanOutIncomplete) as e:
        run_sharded(spec, shards, workers=2, group_size=1)
    assert e.value.unfinished == ["shard-000003"] and "bad sample s020" in e.value.errors[0]
    parts = sorted(p.name for p in step_dir(out, "lengths").glob("*.parquet"))
    assert parts == [f"part-shard-{i:06d}.parquet" for i in (0, 1, 2, 4)]  # no missing part: a re-run decides
    s = run_fanout(StepSpec(Lengths, (out,), {"prev": passing()}), shards, FanOut(workers=2, group_size=1))
    assert s.done == ["shard-000003"] and s.missing == 1


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory)


def test_perplexity_two_workers_equal_sequential(ray_local, lm, tmp_path):
    import torch
    from PIL import Image

    from core.steps.perplexity import tiny_perplexity_config
    from core.steps.perplexity.pipeline import PerplexityStep

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    ss = ppl_samples(clean_records(30, seed=5, prefix="c") + garbled_records(6))
    for s in ss:
        s.image_bytes = [buf.getvalue()] * len(s.images)
    write_shards(ss, str(tmp_path / "shards"), max_samples=9)
    urls = list_shards(str(tmp_path / "shards"))
    prev = Passing.of([s.id for s in ss] + ["ghost"])
    cfg = tiny_perplexity_config(lm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (1 CPU): the same kernels, so the same floats
    try:
        seq = run_sharded(StepSpec(PerplexityStep, (tmp_path / "seq", cfg), {"prev": prev}), urls, workers=1)
    finally:
        torch.set_num_threads(threads)
    par = run_sharded(StepSpec(PerplexityStep, (tmp_path / "par", cfg), {"prev": prev}), urls, workers=2,
                      group_size=1)
    assert len(par.done) == 4 and par.counts == seq.counts and par.missing == seq.missing == 1
    assert tree(tmp_path / "seq") == tree(tmp_path / "par")
