"""Run summary: source accounting proven from the ledger, one-sentence outcome, known-bad recall per step."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.ledger import PASSING, LedgerError, LedgerWriter, check_balance, read_ledger, step_dir
from core.io.ingest import IngestConfig, ingest
from core.runs.summary import check_source_accounting, known_bad_recall, load_id_list, run_sentence
from tasks.types import StepOut


def _ledger(root: Path, step: str, rows: dict[str, str]) -> FlyteDirectory:
    with LedgerWriter(step_dir(root, step) / f"part-{step}.parquet", step) as led:
        for sid, decision in rows.items():
            led.add(sid, decision, "" if decision in PASSING else "planted")
    return FlyteDirectory(str(root))


def _jsonl(path: Path, n_good: int, n_bad: int) -> Path:
    good = [{"id": f"g{i}", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
            for i in range(n_good)]
    bad = [{"id": f"b{i}", "conversations": []} for i in range(n_bad)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    return path


def test_source_accounting_is_checked_against_the_ledger(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", 3, 2)
    ingest(IngestConfig(source=str(src), image_root="", run_dir=str(tmp_path / "run")))
    sd = step_dir(tmp_path / "run", "ingest")
    acc = check_source_accounting(sd, read_ledger(sd))
    assert acc == {"source_records": 5, "ledger_rows": 5, "kept": 3, "quarantined": 2, "files": 1, "balanced": True}
    # a ledger that lost a row no longer matches the count taken from the source bytes
    led = read_ledger(sd)
    with pytest.raises(LedgerError, match="5 records in the source, 4 ingest ledger rows"):
        check_source_accounting(sd, led.iloc[:4])


def test_sentences_for_normal_empty_and_all_quarantined_runs(tmp_path):
    for name, good, bad, expect in [("ok", 3, 2, "5 source records -> 3 passed ingest (2 quarantined) -> 3 samples"),
                                    ("empty", 0, 0, "The source holds no records"),
                                    ("allbad", 0, 2, "All 2 source records were quarantined at ingest")]:
        src = _jsonl(tmp_path / f"{name}.jsonl", good, bad)
        run = tmp_path / name
        ingest(IngestConfig(source=str(src), image_root="", run_dir=str(run)))
        sd = step_dir(run, "ingest")
        sentence = run_sentence(check_balance(run, ["ingest"]), check_source_accounting(sd, read_ledger(sd)))
        assert expect in sentence, sentence


def test_known_bad_recall_per_step():
    import pandas as pd

    ingest_led = pd.DataFrame({"sample_id": ["a", "b", "c", "d"], "decision": ["keep", "keep", "keep", "quarantine"]})
    dedup_led = pd.DataFrame({"sample_id": ["a", "b", "c"], "decision": ["drop", "keep", "keep"]})
    rows = known_bad_recall([("ingest", ingest_led), ("semdedup", dedup_led)], ["a", "d", "zz"])
    assert rows[0] == {"step": "ingest", "entered": 2, "kept": 1, "dropped": 0, "quarantined": 1, "removed": 1,
                       "recall": 0.5, "absent": 1}
    assert rows[1]["entered"] == 1 and rows[1]["dropped"] == 1 and rows[1]["recall"] == 1.0


def test_id_list_formats(tmp_path):
    (tmp_path / "a.json").write_text('["x", "y"]')
    (tmp_path / "b.json").write_text('{"ids": ["x"]}')
    (tmp_path / "c.txt").write_text("# known bad\nx\n\ny\n")
    assert load_id_list(str(tmp_path / "a.json")) == ["x", "y"]
    assert load_id_list(str(tmp_path / "b.json")) == ["x"]
    assert load_id_list(str(tmp_path / "c.txt")) == ["x", "y"]


def test_summarize_run_reports_accounting_sentence_and_known_bad(tmp_path):
    from tasks.run_report import summarize_run

    src = _jsonl(tmp_path / "d.jsonl", 3, 1)
    ingest(IngestConfig(source=str(src), image_root="", run_dir=str(tmp_path / "ingest")))
    dd = _ledger(tmp_path / "dedup", "semdedup", {"g0": "drop", "g1": "keep", "g2": "keep"})
    bad = tmp_path / "bad.txt"
    bad.write_text("g0\nb0\n")
    out = summarize_run(steps=[StepOut("ingest", FlyteDirectory(str(tmp_path / "ingest"))), StepOut("semdedup", dd)],
                        known_bad_ids=FlyteFile(str(bad)))
    s = json.loads(Path(out.path, "summary.json").read_text())
    assert s["source_accounting"]["source_records"] == 4 and s["source_accounting"]["balanced"]
    assert s["sentence"].startswith("4 source records -> 3 passed ingest (1 quarantined) -> 2 samples out")
    per = {r["step"]: r for r in s["known_bad"]["per_step"]}
    assert per["ingest"]["quarantined"] == 1 and per["ingest"]["kept"] == 1
    assert per["semdedup"]["dropped"] == 1 and per["semdedup"]["recall"] == 1.0


def test_write_run_summary_files_and_decks(tmp_path):
    from core.runs.summary import run_summary_decks, write_run_summary

    src = _jsonl(tmp_path / "d.jsonl", 3, 1)
    ingest(IngestConfig(source=str(src), image_root="", run_dir=str(tmp_path / "ingest")))
    _ledger(tmp_path / "dedup", "semdedup", {"g0": "drop", "g1": "keep", "g2": "keep"})
    out = tmp_path / "out"
    rep = write_run_summary([str(tmp_path / "ingest"), str(tmp_path / "dedup")], ["ingest", "semdedup"], str(out),
                            ["g0"])
    assert json.loads((out / "summary.json").read_text()) == rep.summary
    assert pd.read_parquet(out / "counts.parquet")["step"].tolist() == ["ingest", "semdedup"]
    assert len(pd.read_parquet(out / "ledger.parquet")) == 4 + 3  # ingest rows (one quarantined) + semdedup rows
    names = [n for n, _ in run_summary_decks(rep)]
    assert names == ["run summary", "known-bad: ingest", "known-bad: semdedup"]
    assert [n for n, _ in run_summary_decks(write_run_summary([str(tmp_path / "ingest")], ["ingest"],
                                                              str(tmp_path / "o2")))] == ["run summary"]
    with pytest.raises(ValueError, match="steps is empty"):
        write_run_summary([str(tmp_path / "ingest")], [], str(tmp_path / "o3"))
