"""The `curate` workflow end to end (flytekit local execution, in-process, real local Ray), its caching, and
the run summary's loud failure on unbalanced ledgers.

- end to end: rephrase on, a trusted reference set for the perplexity LM; the published run (summary.json,
  ledger.parquet, export/) is checked against the planted defects and against itself.
- caching: with flytekit's local cache, a re-run that changes only `ppl_filter_config.high_pct` re-executes the
  perplexity filter and what follows it, and nothing before it; an identical third run re-executes nothing
  cacheable. Proven with call counters on the core functions the task bodies call.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.demo import generate_demo, plant_eval_contamination
from core.demo.eval_fixtures import write_fixtures
from core.demo.score import score_run
from core.foundation.ledger import PASSING, LedgerError, LedgerWriter, read_ledger, step_dir
from core.io.wds import iter_samples, list_shards
from tasks.types import StepOut

N_SAMPLES = 60  # >= core.demo.MIN_SAMPLES; ~50 survive ingest
SHARD = 25  # ingest shards: 3 for ~50 samples
EXPORT_SHARD = 15  # export shards: >= 2
LM_STEPS = 30


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate_demo")
    generate_demo(str(root / "data"), n_samples=N_SAMPLES, seed=0)
    write_fixtures(str(root / "eval_cache"))
    plant_eval_contamination(str(root / "data"), str(root / "eval_cache"), ["docvqa", "chartqa"], per_benchmark=2)
    generate_demo(str(root / "reference"), n_samples=40, seed=1, corrupt=False)
    return root


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module (embed_shards' local `ray.init` reuses it); shut down after."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _curate(demo: Path, output_dir: Path, config: dict | None = None, **kw):
    """curate on the demo data; `config`: CurateConfig changes (the one override rule) onto the test's sizes."""
    from core.foundation.configs import preset
    from core.runs.config import CurateConfig
    from workflows.curate import curate

    sizes = dict(ingest_config={"shard_max_samples": SHARD}, lm_steps=LM_STEPS, export_config={"max_samples": EXPORT_SHARD})
    cfg = preset(CurateConfig, "demo", **(sizes | (config or {})))
    args = dict(source=str(demo / "data" / "data.json"), image_root=str(demo / "data" / "images"),
                output_dir=str(output_dir), config=cfg)
    return curate(**(args | kw))


@pytest.mark.slow
def test_curate_end_to_end_with_rephrase_and_reference(demo, local_ray, flyte_local_cache, monkeypatch, tmp_path,
                                                       capsys):
    out = tmp_path / "run"
    on = dict(rephrase=True, rephrase_config="tiny", decontam=True, decontam_benchmarks=["docvqa", "chartqa"])
    ref = dict(reference_source=str(demo / "reference" / "data.json"),
               reference_image_root=str(demo / "reference" / "images"),
               reference_ids=FlyteFile(str(demo / "reference" / "ground_truth.json")),
               eval_cache=str(demo / "eval_cache"))
    res = _curate(demo, out, on, **ref)
    assert Path(res.summary.path, "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    steps = [s["step"] for s in summary["steps"]]
    from core.foundation.configs import override, preset
    from core.runs.config import CurateConfig
    from core.runs.steps import active_steps

    assert steps == [s.name for s in active_steps(override(preset(CurateConfig, "demo"), **on))]  # the table's order
    assert steps == ["ingest", "embed", "decontam", "semdedup", "perplexity", "ppl_filter", "rephrase", "export"]

    # every step balances, and each step's inputs are what the previous step passed on
    assert summary["steps"][0]["inputs"] == N_SAMPLES + 4  # + the planted eval copies
    for prev, s in zip([None] + summary["steps"][:-1], summary["steps"]):
        assert s["inputs"] == s["kept"] + s["modified"] + s["dropped"] + s["quarantined"], s
        if prev is not None:
            assert s["inputs"] == prev["kept"] + prev["modified"], (prev, s)
    by_step = {s["step"]: s for s in summary["steps"]}
    assert by_step["semdedup"]["dropped"] > 0 and by_step["ppl_filter"]["dropped"] > 0  # the steps did act

    # the merged ledger: exactly one row per (step, sample_id), as many rows per step as inputs
    ledger = pd.read_parquet(out / "ledger.parquet")
    # the 4 planted copies of eval items (exact and re-encoded) are dropped as contamination of their
    # benchmark, and nothing else is (decontam runs right after embed, so every copy reaches it)
    gt0 = json.loads((demo / "data" / "ground_truth.json").read_text())
    dc = score_run(gt0, ledger)["decontam"]
    assert dc["planted"] == 4 and dc["recall"] == 1.0 and dc["precision"] == 1.0, dc
    assert not ledger.duplicated(["step", "sample_id"]).any()
    assert ledger.groupby("step").size().to_dict() == {s: by_step[s]["inputs"] for s in steps}

    # every planted corrupt sample is quarantined at ingest with its planted reason, and nothing else is
    gt = json.loads((demo / "data" / "ground_truth.json").read_text())
    ingest = ledger[ledger.step == "ingest"].set_index("sample_id")
    quarantined = ingest[ingest.decision == "quarantine"]
    assert set(quarantined.index) == set(gt["corrupt"])
    for sid, kind in gt["corrupt"].items():
        assert quarantined.loc[sid, "reason"].split(":")[0] == kind, (sid, quarantined.loc[sid, "reason"])
    # ... and none of them reaches a later step
    assert not set(gt["corrupt"]) & set(ledger[ledger.step != "ingest"].sample_id)

    # the export: manifest count = final count = kept ids of the export ledger = what the shards hold
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["n_samples"] == summary["final_samples"] > 0
    assert manifest["n_shards"] >= 2
    export_led = read_ledger(step_dir(out / "export", "export"))
    kept = export_led[export_led.decision.isin(PASSING)].sample_id.tolist()
    assert len(kept) == summary["final_samples"]
    shards = list_shards(str(out / "export" / "shards"))
    assert len(shards) == manifest["n_shards"]
    exported = [s.id for s in iter_samples(shards, load_images=False, verify_images=False)]
    assert len(exported) == len(set(exported))
    assert set(exported) == set(kept)
    assert set(kept) == set(ledger[(ledger.step == "rephrase") & ledger.decision.isin(PASSING)].sample_id)

    # findability: each step's deck page is copied to output_dir/decks/<step>.html, and the run ends by
    # printing where the summary, the export and every deck page are
    pages = {p.stem: p.read_text() for p in (out / "decks").glob("*.html")}
    assert sorted(pages) == sorted(steps + ["run_summary", "index"])
    for name, text in pages.items():  # a real page with the step's own deck section(s), not an empty shell
        assert text.startswith("<!doctype html>") and text.count("<section>") >= 1 and len(text) > 2000, name
    for step in steps:  # each page holds its own step only (a local run shares one deck list across tasks)
        assert re.findall(r"<h2>(.*?)</h2>", pages[step]) == [step], step
    assert all(f'href="{step}.html"' in pages["index"] for step in steps + ["run_summary"])
    assert "samples per step" in pages["run_summary"] and "<img" in pages["semdedup"]
    printed = capsys.readouterr().out
    root = out.resolve()
    assert f"{root}/summary.json" in printed and f"{root}/export" in printed
    for name in pages:
        assert f"{root}/decks/{name}.html" in printed, name

    # a re-run with only another export shard size reuses every step before export, the LLM pass included
    calls = _count_calls(monkeypatch)
    _curate(demo, tmp_path / "rerun", on | {"export_config": {"max_samples": EXPORT_SHARD + 10}}, **ref)
    assert calls["rephrase"] == calls["ingest"] == calls["reference_lm"] == calls["perplexity"] == 0, calls
    assert calls["export"] == 1, calls
    again = json.loads((tmp_path / "rerun" / "export" / "manifest.json").read_text())
    assert sorted(i for sh in again["shards"] for i in sh["ids"]) == sorted(kept)
    assert [sh["n_samples"] for sh in again["shards"]] == [len(sh["ids"]) for sh in again["shards"]]
    assert max(sh["n_samples"] for sh in again["shards"]) > EXPORT_SHARD >= max(
        sh["n_samples"] for sh in manifest["shards"])


def _count_calls(monkeypatch) -> Counter:
    """Wrap the core function each task body calls (imported inside the body, so the module attribute is
    what runs) with a counter; returns the Counter (task name -> calls)."""
    import core.io.ingest
    import core.runs.ledger_stream
    import core.steps.dedup.pipeline
    import core.steps.embed
    import core.steps.export
    import core.steps.perplexity.pipeline
    import core.steps.perplexity.reference
    import core.steps.perplexity.slices
    import core.steps.rephrase.step

    calls: Counter = Counter()
    targets = {
        "ingest": (core.io.ingest, "ingest"),
        "embed": (core.steps.embed, "embed_shards"),
        "semdedup_cluster": (core.steps.dedup.pipeline, "cluster_embeddings"),
        "semdedup_prune": (core.steps.dedup.pipeline, "prune_cluster_group"),
        "semdedup_decide": (core.steps.dedup.pipeline, "decide_semdedup"),
        "reference_lm": (core.steps.perplexity.reference, "train_reference_lm"),
        "perplexity": (core.steps.perplexity.pipeline, "score_shards"),
        "ppl_filter": (core.steps.perplexity.slices, "slice_by_perplexity"),
        "rephrase": (core.steps.rephrase.step.RephraseStep, "run"),
        "export": (core.steps.export, "export_curated"),
        "summary": (core.runs.ledger_stream, "merge_run_ledgers"),  # summarize_run's streamed pass over the ledgers
    }
    for name, (module, attr) in targets.items():
        orig = getattr(module, attr)

        def counted(*a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(module, attr, counted)
    return calls


@pytest.mark.slow
def test_changed_perplexity_knob_reruns_only_perplexity_filter_and_after(demo, local_ray, flyte_local_cache,
                                                                         monkeypatch, tmp_path):
    from flytekit.configuration import LocalConfig

    assert LocalConfig.auto().cache_enabled  # flytekit's local cache is on (its default; nothing disables it)
    calls = _count_calls(monkeypatch)
    table = {}

    def run(label: str, high: float):
        calls.clear()
        _curate(demo, tmp_path / label, {"ppl_filter_config": {"high_pct": high}})
        table[label] = dict(calls)

    run("first", 90.0)
    run("second", 80.0)  # only the perplexity filter's knob changes
    run("third", 80.0)  # identical to the second
    print("\ncore calls per run:", json.dumps(table, indent=1))

    upstream = ["ingest", "embed", "semdedup_cluster", "semdedup_prune", "semdedup_decide", "reference_lm",
                "perplexity"]
    downstream = ["ppl_filter", "export"]
    assert all(table["first"].get(k, 0) >= 1 for k in upstream + downstream + ["summary"]), table
    assert all(table["second"].get(k, 0) == 0 for k in upstream), table  # cache hits
    assert all(table["second"].get(k, 0) == 1 for k in downstream), table  # re-executed
    assert all(table["third"].get(k, 0) == 0 for k in upstream + downstream), table  # all cache hits
    # summarize_run is not cached (it publishes to output_dir and re-proves the balance): it runs every time
    assert table["second"]["summary"] == table["third"]["summary"] == 1, table

    # the cached steps hand on the very same outputs; the changed knob changes the curated set
    s = {k: json.loads((tmp_path / k / "summary.json").read_text()) for k in table}
    for a, b in (("first", "second"), ("second", "third")):
        for x, y in zip(s[a]["steps"], s[b]["steps"]):
            if x["step"] in ("ingest", "embed", "semdedup", "perplexity"):
                assert x == y
    assert s["second"]["final_samples"] < s["first"]["final_samples"]
    assert s["third"] == s["second"]
    manifest = {k: json.loads((tmp_path / k / "export" / "manifest.json").read_text()) for k in table}
    assert manifest["third"] == manifest["second"] != manifest["first"]


@pytest.mark.slow
def test_curate_on_every_local_core_decides_as_the_in_process_run(demo, local_ray, tmp_path):
    """The same `curate` with every per-sample step fanned out over 2 local Ray actors (`fanout` preset `local`),
    ingest partitioned at the source and export partitioned over input shards: every step decides the same
    (sample_id, decision, reason) rows as the in-process run; only shard names and export shard boundaries
    differ (docs/ingest.md, docs/export.md). The run is what `pyflyte run` executes locally."""
    on = dict(image_filter=True, rephrase=True, rephrase_config="tiny", decontam=True,
              decontam_benchmarks=["docvqa", "chartqa"])
    local = {"fanout": {"preset": "local"}}
    fanned = dict(on, ingest_config={"shard_max_samples": SHARD, "partition_records": 20, **local},
                  image_filter_config=local, decontam_config=local, perplexity_config=local, rephrase_config=local,
                  export_config={"max_samples": EXPORT_SHARD, "partition_shards": 1, **local})
    fanned["rephrase_config"] = {"preset": "tiny", **local}
    runs = {}
    for label, cfg in (("in_process", on), ("two_workers", fanned)):
        _curate(demo, tmp_path / label, cfg, eval_cache=str(demo / "eval_cache"))
        runs[label] = pd.read_parquet(tmp_path / label / "ledger.parquet")
    cols = ["step", "sample_id", "decision", "reason"]
    a, b = (runs[k][cols].sort_values(cols).reset_index(drop=True) for k in ("in_process", "two_workers"))
    assert a.equals(b)
    assert set(a.step) == {"ingest", "image_filter", "embed", "decontam", "semdedup", "perplexity", "ppl_filter",
                           "rephrase", "export"}
    ingest_shards = set(runs["two_workers"].query("step == 'ingest' and decision == 'keep'").shard)
    assert len(ingest_shards) > 1 and all("-p0" in s for s in ingest_shards)  # partitioned: its own shard names
    summaries = [json.loads((tmp_path / k / "summary.json").read_text()) for k in runs]
    assert summaries[0]["final_samples"] == summaries[1]["final_samples"] > 0


def _ledger(root: Path, step: str, rows: dict[str, str]) -> FlyteDirectory:
    with LedgerWriter(step_dir(root, step) / f"part-{step}.parquet", step) as led:
        for sid, decision in rows.items():
            led.add(sid, decision, "" if decision in PASSING else "planted")
    return FlyteDirectory(str(root))


def test_summarize_run_fails_loudly_on_unbalanced_ledgers(tmp_path):
    from tasks.run_report import summarize_run

    ingest = _ledger(tmp_path / "ingest", "ingest", {"a": "keep", "b": "keep", "c": "keep", "q": "quarantine"})
    good = _ledger(tmp_path / "good", "semdedup", {"a": "keep", "b": "drop", "c": "keep"})
    lost = _ledger(tmp_path / "lost", "semdedup", {"a": "keep", "b": "drop"})  # "c" has no decision
    stray = _ledger(tmp_path / "stray", "semdedup", {"a": "keep", "b": "drop", "c": "keep", "q": "keep"})

    out = summarize_run(steps=[StepOut("ingest", ingest), StepOut("semdedup", good)])  # balanced: passes
    assert json.loads(Path(out.path, "summary.json").read_text())["final_samples"] == 2
    for bad, expect in ((lost, r"1 inputs without a decision \(e.g. \['c'\]\)"),
                        (stray, r"1 decisions for unknown ids \(e.g. \['q'\]\)")):
        with pytest.raises(Exception) as e:
            summarize_run(steps=[StepOut("ingest", ingest), StepOut("semdedup", bad)])
        # flytekit may wrap the user error; the LedgerError must be in the chain
        chain, err = [], e.value
        while err is not None:
            chain.append(err)
            err = err.__cause__ or err.__context__
        assert any(isinstance(x, LedgerError) for x in chain) or "LedgerError" in str(e.value), e.value
        assert e.match(expect)
