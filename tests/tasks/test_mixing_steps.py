"""Mixing steps without Flyte: domains ledger, compute plans, capped soup evaluation through the existing eval
runner (peak soups held <= cap, measured), Spearman table, domain perplexity ledger readable by the slicer."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from core.evals.config import EvalConfig
from core.evals.runner import evaluate_checkpoints
from core.foundation.ledger import read_ledger, step_dir
from core.mixing.domains import DomainConfig, assign_domains, domain_of, load_domains
from core.mixing.pipeline import DomainPerplexityStep, MixingConfig, spearman_by_benchmark, split_heldout
from core.mixing.plan import expert_budget, plan_training
from core.mixing.soups import HoldLog, SoupStore, peak_held
from core.mixing.steps import choose_proxy_subsets, key_of, plan_mixtures, soup_uris


def _s(i, source="", meta=None):
    return SimpleNamespace(id=f"s{i}", source=source, metadata=meta or {}, shard="shard-0.tar")


def test_domain_of_prefers_domain_then_metadata_then_source():
    assert domain_of(SimpleNamespace(domain="charts", metadata={"domain": "x"}, source="y")) == "charts"
    assert domain_of(_s(0, "src", {"domain": "docs"})) == "docs"
    assert domain_of(_s(0, "src")) == "src"
    assert domain_of(_s(0)) == ""


def test_assign_domains_field_ledger_and_quarantine(tmp_path):
    samples = [_s(0, "a"), _s(1, "a"), _s(2, "b"), _s(3, ""), _s(4, "c")]
    summary = assign_domains(samples, tmp_path, DomainConfig(min_samples=1, include=("a", "b")))
    led = read_ledger(step_dir(tmp_path, "domains"))
    assert len(led) == 5  # every sample decided, none silently dropped
    q = led[led.decision == "quarantine"].set_index("sample_id")["reason"].to_dict()
    assert q == {"s3": "no_domain", "s4": "domain_excluded:c"}
    assert load_domains(tmp_path) == {"a": ["s0", "s1"], "b": ["s2"]}
    assert summary["domains"] == {"a": 2, "b": 1}
    assigned = {r.sample_id: json.loads(r.extra)["domain"] for r in led.itertuples() if r.decision == "keep"}
    assert assigned == {"s0": "a", "s1": "a", "s2": "b"}


def test_assign_domains_kmeans_recovers_planted_clusters(tmp_path):
    rng = np.random.default_rng(0)
    centers = np.eye(3) * 10
    x = np.concatenate([centers[i] + rng.normal(0, 0.1, (10, 3)) for i in range(3)])
    ids = [f"s{i}" for i in range(30)]
    samples = [_s(i) for i in range(31)]  # s30 has no embedding
    assign_domains(samples, tmp_path, DomainConfig(mode="kmeans", k=3), (ids, x))
    groups = load_domains(tmp_path)
    assert sorted(len(v) for v in groups.values()) == [10, 10, 10]
    assert {frozenset(v) for v in groups.values()} == {frozenset(ids[i * 10:(i + 1) * 10]) for i in range(3)}
    led = read_ledger(step_dir(tmp_path, "domains"))
    assert led.set_index("sample_id").loc["s30", "reason"] == "domain_no_embedding:image"


def test_equal_compute_plans():
    sizes = {"a": 100, "b": 20}
    budget = expert_budget(sizes, batch_size=8, val_size=4)
    assert budget == 12  # the largest domain's steps per epoch: (100 - 4) // 8
    pa, pb = (plan_training(d, [d], sizes, budget, 8, 4) for d in ("a", "b"))
    assert pa.steps == pb.steps == 12 and pa.samples_seen == pb.samples_seen
    assert pb.epochs == 6  # the small domain is repeated: 2 steps per epoch
    plan = {"budget_steps": budget, "sizes": sizes}
    cfg = MixingConfig(benchmarks=["countbench"], batch_size=8, val_size=4)
    mix = plan_mixtures(["a+b"], plan, cfg)[0]
    assert mix.steps == 24 and mix.domains == ["a", "b"]  # the soup's total compute: 2 experts
    with pytest.raises(ValueError):
        plan_training("c", ["c"], {"c": 5}, 3, 8, 4)


def test_heldout_split_is_stable_and_disjoint():
    groups = {"a": [f"a{i}" for i in range(20)], "b": ["b0", "b1"]}
    tr, he = split_heldout(groups, 5, seed=0)
    assert len(he["a"]) == 5 and not set(he["a"]) & set(tr["a"]) and len(he["b"]) == 1 and len(tr["b"]) == 1
    tr2, he2 = split_heldout({"a": list(reversed(groups["a"]))}, 5, seed=0)
    assert he2["a"] == he["a"]


def _expert(root, name, value):
    d = root / name
    d.mkdir()
    save_file({"w": torch.full((3,), float(value)), "frozen": torch.ones(2)}, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    return str(d)


class _WeightBackend:
    """Answers every prompt with the soup's mean weight (so the score depends on the merged tensors)."""

    def __init__(self, ckpt, device):
        from safetensors.torch import load_file

        self.value = float(load_file(os.path.join(ckpt, "model.safetensors"))["w"][0])

    def generate(self, reqs):
        return [str(round(self.value)) for _ in reqs]

    def close(self):
        pass


@pytest.fixture
def weight_backend():
    from core.evals import register_backend, unregister_backend

    register_backend("soup_weight", _WeightBackend)
    try:
        yield
    finally:
        unregister_backend("soup_weight")


@pytest.mark.parametrize("cap", [1, 2])
def test_capped_soup_evaluation_holds_at_most_cap(tmp_path, weight_backend, cap):
    from core.demo.eval_fixtures import write_fixtures

    cache = str(tmp_path / "cache")
    write_fixtures(cache)
    experts = {d: _expert(tmp_path, d, v) for d, v in zip("abc", (2.0, 4.0, 9.0))}
    log = HoldLog()
    store = SoupStore(experts, local_dir=str(tmp_path), log=log)
    uris = soup_uris(sorted(experts))
    assert len(uris) == 7
    cfg = EvalConfig(cache, ["countbench"], backend="soup_weight", device="cpu", concurrency=cap, max_samples=4)
    res = evaluate_checkpoints(uris, cfg, str(tmp_path / "out"), store)
    assert len(res.table) == 7 and set(res.table["status"]) == {"ok"}
    soups = [r for r in log.rows if r["kind"] == "soup"]
    assert len(soups) == 7
    assert 1 <= peak_held(log.rows, "soup") <= cap  # measured over the run: never more soups than the cap
    assert peak_held(log.rows, "expert") <= cap  # each worker folds its experts in one at a time
    left = [p for p in os.listdir(tmp_path) if p.startswith(("soup-", "ckpt-"))]
    assert left == []  # every soup and expert copy was deleted
    assert key_of("soup/c+a") == "a+c"


def test_spearman_by_benchmark_counts_pairs():
    soup = pd.DataFrame({"x": [1, 2, 3, 4], "y": [1, 1, 1, 1]}, index=["a", "b", "c", "a+b"])
    trained = pd.DataFrame({"x": [10, 30, 20], "y": [1, 2, 3]}, index=["a", "b", "c"])
    r = spearman_by_benchmark(soup, trained).set_index("benchmark")
    assert r.loc["x", "n_pairs"] == 3 and r.loc["x", "spearman"] == pytest.approx(0.5)
    assert r.loc["x", "ci_low"] <= 0.5 <= r.loc["x", "ci_high"]  # the interval over mixtures holds the estimate
    assert math.isnan(r.loc["y", "spearman"])  # a constant side has no rank correlation


def test_choose_proxy_subsets_top_and_random_multi_domain():
    t = pd.DataFrame({"overall": [5, 4, 3, 2, 1, 0]}, index=["a+b", "a", "b", "a+c", "b+c", "c"])
    cfg = MixingConfig(benchmarks=[], proxy_top=2, proxy_random=2)
    # the best subset "a" is one domain: its mixture would be its expert, so the top are multi-domain too
    assert choose_proxy_subsets(t, cfg) == ["a+b", "a+c", "b+c"]


def test_domain_perplexity_ledger_is_sliceable(tmp_path):
    from core.steps.perplexity.slices import SliceConfig, load_ranking, slice_by_perplexity

    # sample_nll rows per (checkpoint, data dir): the expert of `a` finds s_i costing i nats, the base 5
    nll = {("exp_a", "data_a"): [{"sample_id": f"s{i}", "nll_sum": float(i), "n_tokens": 5} for i in range(10)]
           + [{"sample_id": "z", "nll_sum": 0.0, "n_tokens": 0}],
           ("base", "data_a"): [{"sample_id": f"s{i}", "nll_sum": 5.0, "n_tokens": 5} for i in range(10)]
           + [{"sample_id": "z", "nll_sum": 0.0, "n_tokens": 0}]}
    calls = []

    def scorer(ckpt, data, device, max_seq_len):
        calls.append(ckpt)
        return nll[(ckpt, data)]

    step = DomainPerplexityStep(str(tmp_path), {"a": "exp_a"}, "base", {"a": "data_a"}, nll=scorer)
    assert step.run(["a"]).done == ["a"] and calls == ["exp_a", "base"]
    summary = step.summary()
    assert summary["a"]["n"] == 10 and summary == json.loads((tmp_path / "domain_perplexity" / "summary.json").read_text())
    again = DomainPerplexityStep(str(tmp_path), {"a": "exp_a"}, "base", {"a": "data_a"}, nll=scorer)
    assert again.run(["a"]).skipped == ["a"] and len(calls) == 2 and again.summary() == summary  # resumed: no rescoring
    ids, ppl, _, raw = load_ranking(str(tmp_path), 0.0)
    assert raw[list(ids).index("s0")] == pytest.approx(math.exp(-1.0))  # ratio = exp((0 - 5) / 5)
    res = slice_by_perplexity(str(tmp_path), str(tmp_path / "sl"), SliceConfig(mode="slices", n_slices=2,
                                                                              shrink_tokens=0.0))
    # slice 00 = the samples the expert found easiest relative to the base (lowest ratio): s0..s4
    assert res["n_kept"] == 10 and [m["n"] for m in res["slices"]] == [5, 5]
    assert json.loads(open(res["slices"][0]["ids"]).read()) == [f"s{i}" for i in range(5)]
    led = read_ledger(step_dir(tmp_path, "perplexity"))
    assert led.set_index("sample_id").loc["z", "reason"] == "ppl_no_scored_tokens"


def test_train_expert_with_an_external_trainer_command(tmp_path):
    """The team's trainer gets the plan's steps, batch and the base as placeholders; its last checkpoint is the expert."""
    import sys

    from flytekit.types.directory import FlyteDirectory

    from tasks.mixing import train_expert

    (tmp_path / "data" / "shards").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    script = tmp_path / "fake_trainer.py"
    script.write_text("import json, os, sys\nout, steps, bs, init = sys.argv[1:5]\n"
                      "os.makedirs(os.path.join(out, 'step-' + steps))\n"
                      "json.dump({'steps': int(steps), 'batch': int(bs), 'init': init},"
                      " open(os.path.join(out, 'step-' + steps, 'args.json'), 'w'))\n")
    plan = json.dumps({"name": "a", "domains": ["a"], "n_samples": 40, "steps": 7, "epochs": 1, "batch_size": 4})
    cmd = f"{sys.executable} {script} {{ckpt_dir}} {{max_steps}} {{batch_size}} {{init_from}}"
    out = train_expert(data=FlyteDirectory(str(tmp_path / "data")), plan=plan, base=FlyteDirectory(str(tmp_path / "base")),
                       config=MixingConfig(benchmarks=[]), external_command=cmd)
    args = json.load(open(os.path.join(out.path, "args.json")))
    assert args["steps"] == 7 and args["batch"] == 4 and args["init"].rstrip("/").endswith("base")


def test_constant_lr_schedule_for_experts():
    from core.train.config import TrainConfig
    from core.train.loop import _lr_lambda

    const, cos = _lr_lambda(2, 100, "constant"), _lr_lambda(2, 100)
    assert [const(s) for s in (0, 1, 2, 50, 99)] == [0.5, 1.0, 1.0, 1.0, 1.0]  # warmup, then flat
    assert cos(99) < 0.01 < cos(50)
    with pytest.raises(ValueError):
        TrainConfig(output_dir="x", vision_model="v", lm_path="l", lr_schedule="linear")
