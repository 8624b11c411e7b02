"""The rephrase_samples Flyte task, executed locally on CPU with a tiny random chat model."""

import json

from flytekit.types.directory import FlyteDirectory

from core.foundation.configs import preset
from core.foundation.ledger import read_ledger, step_dir
from core.foundation.sample import Sample
from core.io.wds import write_shards
from core.steps.rephrase.config import RephraseConfig
from core.steps.rephrase.tiny_model import random_chat_lm
from tasks.rephrase import rephrase_samples
from tasks.types import StepOut


def test_rephrase_samples_task_runs_locally_and_reports(tmp_path):
    recs = [
        {"id": f"s{i}", "conversations": [
            {"from": "human", "value": f"What is written on the sign number {i} in the picture?"},
            {"from": "gpt", "value": f"The sign number {i} says that the shop opens at 9 and closes at 17."}]}
        for i in range(6)
    ]
    samples = [Sample.from_record(r) for r in recs]
    write_shards(samples, str(tmp_path / "run" / "shards"), max_samples=3)
    model = random_chat_lm([r["conversations"][1]["value"] for r in recs] * 5, tmp_path / "model")
    out = rephrase_samples(
        run=StepOut("ingest", FlyteDirectory(str(tmp_path / "run"))),
        config=preset(RephraseConfig, "tiny", max_new_tokens=6, chunk_size=2),
        model_dir=FlyteDirectory(str(model)),
        checkpoint_dir=str(tmp_path / "out"),
    )
    report = json.loads(open(out.report.path).read())
    assert report["n_samples"] == 6 and report["tokens_before"]["total"] > 0
    led = read_ledger(step_dir(tmp_path / "out", "rephrase"))
    assert sorted(led["sample_id"]) == [f"s{i}" for i in range(6)]
    # random weights write no usable text (whitespace or unfinished): every original is kept, and the
    # report says so
    assert set(led["decision"]) == {"keep"} and all(r.startswith("rephrase_rejected:") for r in led["reason"])
    assert "rejected 100%" in report["verdict"]
    assert (tmp_path / "out" / "rephrase" / "report.html").exists()


def test_prev_without_its_ledger_is_refused_before_any_work(tmp_path):
    import pytest

    write_shards([Sample.from_record({"id": "s0", "conversations": [{"from": "human", "value": "Hi?"},
                                                                    {"from": "gpt", "value": "Hello."}]})],
                 str(tmp_path / "run" / "shards"))
    run = StepOut("ingest", FlyteDirectory(str(tmp_path / "run")))
    with pytest.raises(Exception, match="semdedup"):  # the folder holds no ledger/semdedup/
        rephrase_samples(run=run, prev=StepOut("semdedup", FlyteDirectory(str(tmp_path / "run"))),
                         checkpoint_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
