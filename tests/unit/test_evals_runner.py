"""Loaders on the fixtures, per-sample records, failure isolation and the concurrency cap of the runner."""

from __future__ import annotations

import json
import os
import threading

import pandas as pd
import pytest

from core.demo.eval_fixtures import write_fixtures
from core.evals import (
    CheckpointStore,
    EvalConfig,
    EvalItem,
    LoadFailure,
    evaluate_benchmark,
    evaluate_checkpoint,
    evaluate_checkpoints,
    get_benchmark,
    list_checkpoints,
    register_backend,
    tiny_eval_config,
    unregister_backend,
)
from core.evals.checkpoints import checkpoint_epoch, checkpoint_position, checkpoint_step
from core.evals.results import RECORD_COLUMNS
from tests.evals_doubles import OracleBackend, oracle_table

BENCHES = ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_cache")
    truth = write_fixtures(str(root))
    return str(root), truth


@pytest.fixture(scope="module")
def table(cache):
    return oracle_table(cache[0], BENCHES)


@pytest.fixture
def oracle(table):
    """Registers the 'oracle' backend kind for one test (removed in teardown even if the test fails)."""
    loads = []

    def factory(ckpt_dir, device):
        loads.append(ckpt_dir)
        if os.path.exists(os.path.join(ckpt_dir, "BROKEN")):
            raise RuntimeError("planted load failure")
        return OracleBackend(table, ckpt_dir)

    register_backend("oracle", factory)
    try:
        yield loads
    finally:
        unregister_backend("oracle")


def make_ckpts(root, epochs, wrong=(), broken=()):
    out = []
    for e in epochs:
        d = os.path.join(root, f"epoch_{e}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "weights.bin"), "wb") as f:
            f.write(os.urandom(1024))
        if e in wrong:
            open(os.path.join(d, "WRONG"), "w").close()
        if e in broken:
            open(os.path.join(d, "BROKEN"), "w").close()
        out.append(d)
    return out


def cfg_for(cache_dir, **kw):
    cfg = tiny_eval_config(cache_dir)
    cfg.backend = "oracle"
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# ---- loaders ----------------------------------------------------------------------------------------------


def test_fixtures_load_in_published_layouts(cache):
    root, truth = cache
    for name in BENCHES:
        items = list(get_benchmark(name).load(os.path.join(root, name)))
        assert sorted(i.id for i in items) == sorted(truth[name]) or name == "pixmo_points"
    pix = list(get_benchmark("pixmo_points").load(os.path.join(root, "pixmo_points")))
    fails = [i for i in pix if isinstance(i, LoadFailure)]
    assert [f.reason for f in fails] == ["missing_image:not in cache"]
    doc = [i for i in get_benchmark("docvqa").load(os.path.join(root, "docvqa"))]
    assert doc[0].target == ["42", "42.00"]


def test_chartqa_hf_parquet_layout(tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = open(os.path.join(cache[0], "chartqa", "test", "png", "human_0.png"), "rb").read()
    rows = [{"type": "human_test", "question": "Q1?", "answer": "12", "image": {"bytes": png, "path": "a.png"}},
            {"type": "augmented_test", "question": "Q2?", "answer": "x", "image": {"bytes": None, "path": "b.png"}}]  # fmt: skip
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    items = list(get_benchmark("chartqa").load(str(tmp_path)))
    assert isinstance(items[0], EvalItem) and items[0].meta["split"] == "human" and items[0].target == "12"
    assert isinstance(items[1], LoadFailure) and items[1].reason.startswith("missing_image")


# ---- records --------------------------------------------------------------------------------------------


def test_oracle_scores_every_loadable_sample_and_records_defects(cache, table, tmp_path):
    root, _ = cache
    backend = OracleBackend(table, str(tmp_path))
    for name in BENCHES:
        recs = evaluate_benchmark(backend, get_benchmark(name), os.path.join(root, name), checkpoint="x/epoch_1")
        ok = [r for r in recs if not r["error"]]
        # 1.0, or Molmo's F1 with its 1e-10 epsilon (2 / (2 + 1e-10)) for pixmo_points
        assert ok and all(r["parsing_success"] and r["score"] >= 1 - 1e-9 and r["correct"] for r in ok), name
        for r in recs:
            assert set(r) == set(RECORD_COLUMNS)
            assert r["epoch"] == 1 and r["step"] is None and r["benchmark"] == name and r["variant"] == "x"
    cb = evaluate_benchmark(backend, get_benchmark("countbench"), os.path.join(root, "countbench"))
    bad = [r for r in cb if r["error"]]
    assert [(r["sample_id"], r["error"]) for r in bad] == [("countbench-00004", "corrupt_image:UnidentifiedImageError")]
    assert bad[0]["score"] == 0.0 and not bad[0]["parsing_success"]


def test_generation_error_is_isolated_to_its_sample(cache, table, tmp_path):
    root, _ = cache
    backend = OracleBackend(table, str(tmp_path), fail_on="Who is the letter addressed to")
    recs = evaluate_benchmark(backend, get_benchmark("docvqa"), os.path.join(root, "docvqa"), batch_size=8)
    by_id = {r["sample_id"]: r for r in recs}
    assert by_id["docvqa-1002"]["error"].startswith("generation_error:RuntimeError")
    assert by_id["docvqa-1002"]["raw_output"] is None
    assert by_id["docvqa-1000"]["score"] == 1.0 and by_id["docvqa-1001"]["score"] == 1.0
    assert backend.calls == 1 + 3  # the batch, then one call per request


class ScriptedBackend:
    def __init__(self, reply):
        self.reply = reply

    def generate(self, requests):
        return [self.reply for _ in requests]

    def close(self):
        pass


def test_unparsable_output_is_recorded(cache):
    root, _ = cache
    recs = evaluate_benchmark(ScriptedBackend("I am not sure."), get_benchmark("realworldqa"),
                              os.path.join(root, "realworldqa"), scoring="lenient")  # fmt: skip
    mc = [r for r in recs if r["sample_id"] != "realworldqa-00003"]
    assert all(not r["parsing_success"] and r["raw_output"] == "I am not sure." and r["score"] == 0.0 for r in mc)
    assert all(not r["lenient_parsing_success"] and r["lenient_score"] == 0.0 for r in mc)
    assert all(json.loads(r["details"])["lenient_parse_reason"] == "no_option" for r in mc)


# ---- checkpoints -----------------------------------------------------------------------------------------


def test_failed_checkpoints_do_not_sink_the_others(cache, oracle, tmp_path):
    ckpts = make_ckpts(tmp_path / "ckpts", [1, 2, 3], wrong=(2,), broken=(3,))
    ckpts.append(str(tmp_path / "ckpts" / "epoch_4"))  # does not exist
    res = evaluate_checkpoints(ckpts, cfg_for(cache[0]), str(tmp_path / "out"))
    t = res.table.set_index("checkpoint_name")
    assert list(t.index) == ["epoch_1", "epoch_2", "epoch_3", "epoch_4"]
    assert t.loc["epoch_1", "status"] == "ok" and t.loc["epoch_2", "status"] == "ok"
    assert t.loc["epoch_2", "docvqa"] == 0.0 and t.loc["epoch_1", "docvqa"] == 1.0
    assert t.loc["epoch_3", "status"] == "failed" and "planted load failure" in t.loc["epoch_3", "error"]
    assert t.loc["epoch_4", "status"] == "failed" and "checkpoint not found" in t.loc["epoch_4", "error"]
    assert pd.isna(t.loc["epoch_3", "docvqa"])
    assert res.failed_checkpoints == sorted(ckpts[2:])
    # countbench: 4 of 5 samples right (one corrupt image) -> 0.8 ; pixmo: 3 of 4 (one missing image)
    assert t.loc["epoch_1", "countbench"] == pytest.approx(0.8)
    assert t.loc["epoch_1", "pixmo_points"] == pytest.approx(0.75)
    on_disk = pd.read_parquet(tmp_path / "out" / "records.parquet")
    assert len(on_disk) == len(res.records) == 2 * (5 + 3 + 4 + 4 + 4)
    assert list(on_disk.columns) == RECORD_COLUMNS
    summ = pd.read_parquet(tmp_path / "out" / "summary.parquet")
    assert len(summ) == 4 * 5 and set(summ["status"]) == {"ok", "failed"}


def test_missing_benchmark_cache_is_partial(cache, oracle, tmp_path):
    ckpts = make_ckpts(tmp_path / "ckpts", [1])
    cfg = cfg_for(cache[0], benchmarks=["docvqa", "nope_bench"])
    res = evaluate_checkpoints(ckpts, cfg, str(tmp_path / "out"))
    assert res.table.loc[0, "status"] == "partial" and res.table.loc[0, "docvqa"] == 1.0
    err = res.summary.set_index("benchmark").loc["nope_bench", "error"]
    assert err.startswith("benchmark_error:KeyError")


class CountingStore(CheckpointStore):
    """The real fsspec download/delete, instrumented: how many checkpoints are held at once. The first `cap`
    fetches wait for each other on a barrier, so reaching `cap` does not depend on thread timing."""

    def __init__(self, cap):
        super().__init__()
        self.lock = threading.Lock()
        self.held = 0
        self.max_held = 0
        self.fetched, self.released = [], []
        self.barrier = threading.Barrier(cap)
        self.n_fetch = 0

    def fetch(self, uri):
        local = super().fetch(uri)
        with self.lock:
            self.held += 1
            self.max_held = max(self.max_held, self.held)
            self.fetched.append(local)
            self.n_fetch += 1
            first_round = self.n_fetch <= self.barrier.parties
        if first_round:
            self.barrier.wait(timeout=30)
        return local

    def release(self, local):
        assert os.path.exists(os.path.join(local, "weights.bin"))  # it really was downloaded
        super().release(local)
        assert not os.path.exists(local)
        with self.lock:
            self.held -= 1
            self.released.append(local)


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_never_more_than_cap_checkpoints_held(cache, oracle, tmp_path, cap):
    ckpts = make_ckpts(tmp_path / "ckpts", range(1, 7))
    store = CountingStore(cap)
    cfg = cfg_for(cache[0], concurrency=cap, benchmarks=["countbench", "docvqa", "realworldqa"])
    res = evaluate_checkpoints(ckpts, cfg, str(tmp_path / "out"), store=store)
    assert store.max_held == cap  # reached, never exceeded
    assert store.held == 0 and sorted(store.fetched) == sorted(store.released) and len(store.fetched) == 6
    assert len(oracle) == 6  # one model load per checkpoint, shared by its three benchmarks
    assert (res.table["status"] == "ok").all()


def test_evaluate_checkpoint_writes_worker_outputs(cache, oracle, tmp_path):
    (ck,) = make_ckpts(tmp_path / "ckpts", [5])
    wdir = evaluate_checkpoint(ck, cfg_for(cache[0], benchmarks=["chartqa"]), str(tmp_path / "w"))
    recs = pd.read_parquet(os.path.join(wdir, "records.parquet"))
    assert len(recs) == 4 and recs["correct"].all()
    assert recs["latency_s"].ge(0).all() and (recs["checkpoint"] == ck).all()


def test_list_checkpoints_and_epochs(tmp_path):
    make_ckpts(tmp_path, [10, 2, 1])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["epoch_1", "epoch_2", "epoch_10"]
    assert checkpoint_epoch("s3://b/final") is None and checkpoint_step("s3://b/final") is None
    # a step-named checkpoint is a step, not an epoch (issue 14: "step-00000030" was shown as epoch 30)
    assert checkpoint_step("s3://b/run/checkpoint-300/") == 300 and checkpoint_epoch("s3://b/run/checkpoint-300/") is None
    assert checkpoint_step("s3://b/run/step-00000030") == 30 and checkpoint_epoch("s3://b/run/step-00000030") is None
    assert checkpoint_epoch("s3://b/run/epoch-0003") == 3.0 and checkpoint_step("s3://b/run/epoch-0003") is None
    assert checkpoint_position("s3://b/runs/dedup10/checkpoints/epoch-0002").variant == "dedup10"


def test_trainer_state_gives_step_and_fractional_epoch(tmp_path):
    """core/train writes trainer_state.json in every checkpoint: global_step, epoch, step_in_epoch."""
    for name, state in [("step-00000030", {"global_step": 30, "epoch": 1, "step_in_epoch": 10}),
                        ("epoch-0002", {"global_step": 40, "epoch": 2, "step_in_epoch": 0})]:  # fmt: skip
        d = tmp_path / "baseline" / "checkpoints" / name
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({**state, "data": {"steps_per_epoch": 20}}))
    mid = checkpoint_position(str(tmp_path / "baseline/checkpoints/step-00000030"))
    end = checkpoint_position(str(tmp_path / "baseline/checkpoints/epoch-0002"))
    assert (mid.step, mid.epoch, mid.variant) == (30, 1.5, "baseline")
    assert (end.step, end.epoch, end.variant) == (40, 2.0, "baseline")
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "baseline/checkpoints"))]
    assert names == ["step-00000030", "epoch-0002"]
    # a transformers Trainer checkpoint: trainer_state.json with a float epoch
    hf = tmp_path / "hf" / "checkpoint-300"
    hf.mkdir(parents=True)
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 300, "epoch": 2.5, "log_history": []}))
    pos = checkpoint_position(str(hf))
    assert (pos.step, pos.epoch, pos.variant) == (300, 2.5, "hf")
    # the trainer's run_name (an ablation variant) names the run even under a hashed output folder
    named = tmp_path / "1e9b4f1de6f24918" / "checkpoints" / "step-00000030"
    named.mkdir(parents=True)
    (named / "trainer_state.json").write_text(json.dumps({"global_step": 30, "epoch": 0, "step_in_epoch": 30,
                                                          "run_name": "semdedup@0.1"}))
    assert checkpoint_position(str(named)).variant == "semdedup@0.1"


def test_config_validation(cache, tmp_path):
    with pytest.raises(ValueError):
        evaluate_checkpoints([], EvalConfig(cache[0], ["docvqa"], concurrency=0), str(tmp_path))


# ---- lmms-eval-shaped outputs, step/epoch, variants ------------------------------------------------------


def _trained_ckpts(root, variant, steps, wrong=()):
    """Checkpoints as core/train lays them out: <variant>/checkpoints/step-XXXXXXXX with trainer_state.json."""
    out = []
    for s in steps:
        d = os.path.join(root, variant, "checkpoints", f"step-{s:08d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "weights.bin"), "wb") as f:
            f.write(os.urandom(64))
        with open(os.path.join(d, "trainer_state.json"), "w") as f:
            json.dump({"global_step": s, "epoch": s // 20, "step_in_epoch": s % 20, "data": {"steps_per_epoch": 20}}, f)
        if s in wrong:
            open(os.path.join(d, "WRONG"), "w").close()
        out.append(d)
    return out


def test_lmms_eval_shaped_outputs(cache, oracle, tmp_path):
    import math
    import statistics

    ckpts = _trained_ckpts(tmp_path, "baseline", [10, 30], wrong=(10,)) + _trained_ckpts(tmp_path, "dedup", [10, 30])
    cfg = cfg_for(cache[0], scoring="lenient")
    res = evaluate_checkpoints(ckpts, cfg, str(tmp_path / "out"))
    # step 30 is step 30 (epoch 1.5), not "epoch 30"; one row per (variant, step)
    t = res.table
    assert list(zip(t["variant"], t["step"], t["epoch"], strict=True)) == [
        ("baseline", 10, 0.5, ), ("baseline", 30, 1.5), ("dedup", 10, 0.5), ("dedup", 30, 1.5)]
    summ = res.summary.set_index(["variant", "step", "benchmark"])
    assert summ.loc[("baseline", 10, "docvqa"), "score"] == 0.0 and summ.loc[("baseline", 30, "docvqa"), "score"] == 1.0
    assert summ.loc[("dedup", 30, "chartqa"), "lenient_metric"] == "relaxed_accuracy"

    combined = json.loads((tmp_path / "out" / "results.json").read_text())["checkpoints"]
    assert set(combined) == set(ckpts)
    r = combined[ckpts[1]]  # baseline step 30
    assert r["mmcurate"]["step"] == 30 and r["mmcurate"]["epoch"] == 1.5 and r["mmcurate"]["variant"] == "baseline"
    assert r["config"]["model_args"] == f"pretrained={ckpts[1]}" and r["config"]["scoring"] == "lenient"
    assert r["code"]["evals_code_sha256"] and "transformers" in r["code"]["libraries"]
    assert set(r["results"]) == set(BENCHES)
    # countbench: 5 docs, one corrupt image (counts 0): acc 0.8, lmms-eval's mean_stderr = stdev / sqrt(n)
    cb = r["results"]["countbench"]
    assert cb["acc,none"] == pytest.approx(0.8)
    assert cb["acc_stderr,none"] == pytest.approx(statistics.stdev([1, 1, 1, 1, 0]) / math.sqrt(5))
    assert r["n-samples"]["countbench"] == {"original": 5, "effective": 5}
    assert "relaxed_human_split,none" in r["results"]["chartqa"] and "relaxed_overall,none" in r["results"]["chartqa"]
    assert r["results"]["docvqa"]["anls_stderr,none"] == 0.0  # all right: no spread
    # pixmo: Molmo means over scored samples; precision/recall/f1 all reported
    assert {"f1,none", "precision,none", "recall,none"} <= set(r["results"]["pixmo_points"])

    # samples JSONL: one line per doc, lmms-eval's keys
    worker = [d for d in os.listdir(tmp_path / "out" / "lmms_eval") if d.startswith("step-00000030")]
    lines = []
    for w in worker:
        p = tmp_path / "out" / "lmms_eval" / w / "samples_realworldqa.jsonl"
        lines += [json.loads(x) for x in p.read_text().splitlines()]
    assert len(lines) == 2 * 4
    first = lines[0]
    assert {"doc_id", "target", "resps", "filtered_resps", "exact_match", "prompt", "arguments", "lenient"} <= set(first)
    assert first["doc_id"] == 0 and first["resps"] == [[first["filtered_resps"][0]]]
    assert first["exact_match"] == 1.0 and first["target"] == "A" and first["extracted"] == "A"
    assert sorted(x["doc_id"] for x in lines[:4]) == [0, 1, 2, 3]


def test_plot_draws_one_line_per_variant_over_steps(monkeypatch):
    import core.evals.report as report

    rows = []
    for variant in ("baseline", "dedup", "ppl"):
        for step in (10, 20, 30):
            for bench in ("docvqa", "chartqa"):
                rows.append({"checkpoint": f"{variant}/step-{step}", "variant": variant, "step": step, "epoch": None,
                             "benchmark": bench, "metric": "m", "score": step / 40, "score_stderr": 0.01,
                             "status": "ok"})  # fmt: skip
    figs = []
    monkeypatch.setattr(report, "figure_html", lambda fig, title: figs.append((fig, title)) or "")
    report.score_vs_step_html(pd.DataFrame(rows))
    (fig, title), = figs
    assert title == "Score vs step (one line per variant)"
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.containers) == 3  # one errorbar line per variant
        xs = sorted({float(x) for line in ax.get_lines() for x in line.get_xdata()})
        assert xs == [10.0, 20.0, 30.0]
