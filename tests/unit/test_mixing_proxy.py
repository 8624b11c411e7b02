"""The proof of the proxy: the Spearman + bootstrap statistic shared by `prove_proxy` and
benchmarks/mixing_proxy.py, the protocol's pieces (mixture choice, balanced domains, statistics over rows),
domain names that can never become unsafe folder names, and (slow) the benchmark protocol end to end."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest

from core.foundation.ledger import read_ledger, step_dir
from core.mixing.domains import DomainConfig, assign_domains, check_domain_name, clean_name, load_domains
from core.mixing.pipeline import MixingConfig, balance_train_sets
from core.mixing.proxy import mixture_subsets, overall, proxy_statistics
from core.mixing.soups import parse_soup_uri, soup_uri
from core.mixing.stats import spearman_interval

# ---- the statistic ------------------------------------------------------------------------------------


def test_perfect_ranking_is_one_and_reversed_is_minus_one():
    x = [0.1, 0.5, 0.2, 0.9, 0.7, 0.3]
    up = spearman_interval(x, [10 * v + 1 for v in x], n_boot=500)
    assert up["rho"] == pytest.approx(1.0) and up["lo"] == pytest.approx(1.0) and up["hi"] == pytest.approx(1.0)
    down = spearman_interval(x, [-v ** 3 for v in x], n_boot=500)  # monotone decreasing, not linear
    assert down["rho"] == pytest.approx(-1.0) and down["hi"] == pytest.approx(-1.0)
    assert up["n"] == down["n"] == 6 and up["n_boot"] == 500


def test_interval_contains_estimate_and_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    x = rng.normal(size=20)
    y = x + rng.normal(scale=1.0, size=20)
    r = spearman_interval(x, y, n_boot=1000, seed=1)
    assert r["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert -1 <= r["lo"] < r["rho"] < r["hi"] <= 1  # a noisy ranking: a real interval around the estimate
    assert r["n_boot_valid"] == 1000
    assert spearman_interval(x, y, n_boot=1000, seed=1) == r  # seeded: the same interval every run


def test_degenerate_inputs_give_nan_not_a_number_that_looks_real():
    assert math.isnan(spearman_interval([1, 2], [1, 2])["rho"])  # < 3 pairs
    const = spearman_interval([1, 1, 1, 1], [1, 2, 3, 4])
    assert math.isnan(const["rho"]) and math.isnan(const["lo"]) and const["n"] == 4
    # non-finite pairs are dropped (a failed evaluation), the rest is used
    r = spearman_interval([1, 2, float("nan"), 3, 4], [2, 4, 5, 6, 8], n_boot=200)
    assert r["n"] == 4 and r["rho"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        spearman_interval([1, 2, 3], [1, 2])


# ---- protocol pieces ----------------------------------------------------------------------------------


def test_mixture_subsets_are_multi_domain_and_seeded():
    doms = ["a", "b", "c", "d", "e"]
    every = mixture_subsets(doms, 0)
    assert len(every) == 26 and all("+" in k for k in every)  # 2^5 - 1 - 5 singletons
    some = mixture_subsets(doms, 12, seed=0)
    assert len(some) == 12 and set(some) <= set(every) and some == mixture_subsets(doms, 12, seed=0)
    assert mixture_subsets(doms, 12, seed=1) != some


def test_balanced_train_sets_weigh_domains_equally():
    train = {"a": [f"a{i}" for i in range(30)], "b": [f"b{i}" for i in range(10)]}
    bal = balance_train_sets(train, seed=0)
    assert {d: len(v) for d, v in bal.items()} == {"a": 10, "b": 10}
    assert set(bal["a"]) <= set(train["a"]) and bal["b"] == sorted(train["b"])
    assert balance_train_sets({"a": list(reversed(train["a"])), "b": train["b"]}, seed=0) == bal  # order-free


def test_proxy_statistics_over_rows():
    doms = ["x", "y"]
    rows = []
    for i in range(8):  # the soup ranks like training; the experts' mean ranks the other way
        t = {"nll_x": -5 + 0.1 * i, "nll_y": -4 + 0.05 * i}
        rows.append({"subset": f"m{i}", "trained": t, "soup": {k: v - 0.3 for k, v in t.items()},
                     "experts_mean": {k: -v for k, v in t.items()}})
    st = proxy_statistics(rows, doms, n_boot=200)
    assert st["soup"]["rho"] == pytest.approx(1.0) and st["soup"]["n"] == 8
    assert st["experts_mean"]["rho"] == pytest.approx(-1.0)
    assert "reseeded" not in st and st["soup:nll_y"]["rho"] == pytest.approx(1.0)
    assert overall(rows[0]["trained"]) == pytest.approx(-4.5)
    assert "soup@seed_mean" not in st  # no second training, no seed-mean reference
    assert "n_domains" not in st
    for i, r in enumerate(rows):  # the null proxy: more domains, worse training here
        r["n_domains"] = 2 + (7 - i) // 3
    assert proxy_statistics(rows, doms, n_boot=200)["n_domains"]["rho"] < -0.9


def test_proxy_statistics_against_the_mean_of_two_trainings():
    """With a second training, each proxy is also compared with the mean of the two trainings' overall scores
    (the soup here ranks like the seed-free score, the experts' mean the reverse)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        true = -5 + 0.1 * i
        t, r = true + rng.normal(scale=0.3), true + rng.normal(scale=0.3)
        rows.append({"subset": f"m{i}", "trained": {"nll_x": t}, "reseeded": {"nll_x": r},
                     "soup": {"nll_x": true - 0.2}, "experts_mean": {"nll_x": -true}})
    st = proxy_statistics(rows, ["x"], n_boot=200)
    from scipy.stats import spearmanr

    mean = [(row["trained"]["nll_x"] + row["reseeded"]["nll_x"]) / 2 for row in rows]
    assert st["soup@seed_mean"]["rho"] == pytest.approx(spearmanr(list(range(12)), mean).statistic)
    assert st["experts_mean@seed_mean"]["rho"] == pytest.approx(-st["soup@seed_mean"]["rho"])
    assert st["soup@seed_mean"]["n"] == 12 and st["soup@seed_mean"]["lo"] <= st["soup@seed_mean"]["rho"]


# ---- domain names never become unsafe folder names ----------------------------------------------------


@pytest.mark.parametrize("raw", [".", "..", "...", "/", "../..", " . ", "\x00", "\n\t", "x" * 101])
def test_unsafe_domain_names_have_no_slug(raw):
    assert clean_name(raw) == ""
    with pytest.raises(ValueError, match="not a safe folder name"):
        check_domain_name(raw)


@pytest.mark.parametrize("raw,slug", [("../etc", "etc"), ("a/b", "a_b"), ("x\x00y", "x_y"), ("chart", "chart"),
                                      (".hidden", "hidden"), ("Chart & Doc", "Chart_Doc"), ("v1.2", "v1.2")])
def test_domain_names_map_to_safe_slugs(raw, slug):
    assert clean_name(raw) == slug
    assert check_domain_name(slug) == slug
    assert clean_name("_._") == ""  # only separators left: no name


def _s(i, domain):
    return SimpleNamespace(id=f"s{i}", source="", metadata={"domain": domain}, shard="shard-0.tar")


def test_assign_domains_quarantines_dot_names_and_never_merges_colliding_names(tmp_path):
    names = ["chart", ".", "..", "../..", "x\x00y", "a/b", "a_b", "a_b", "p/q", "p:q", "chart"]
    samples = [_s(i, d) for i, d in enumerate(names)]
    summary = assign_domains(samples, tmp_path, DomainConfig())
    led = read_ledger(step_dir(tmp_path, "domains")).set_index("sample_id")
    assert len(led) == len(names)  # every sample decided, none dropped
    q = led[led.decision == "quarantine"]["reason"].to_dict()
    assert q == {"s1": "domain_name_invalid", "s2": "domain_name_invalid", "s3": "domain_name_invalid",
                 "s5": "domain_name_collision:a_b",  # `a/b` is not merged into the real domain `a_b`
                 "s8": "domain_name_collision:p_q", "s9": "domain_name_collision:p_q"}  # neither is its own slug
    groups = load_domains(tmp_path)
    assert groups == {"a_b": ["s6", "s7"], "chart": ["s0", "s10"], "x_y": ["s4"]}
    assert summary["reasons"] == {"domain_name_invalid": 3, "domain_name_collision": 3}
    assert all(check_domain_name(d) for d in groups)


def test_a_hand_written_dot_domain_is_refused_before_any_folder_is_made(tmp_path):
    from core.mixing.steps import prepare_experts

    (tmp_path / "dom" / "domains").mkdir(parents=True)
    (tmp_path / "dom" / "domains" / "domains.json").write_text(json.dumps({"..": ["s0", "s1"], "ok": ["s2"]}))
    out = tmp_path / "deep" / "prep"
    with pytest.raises(ValueError, match="not a safe folder name"):
        prepare_experts([], [], ["ingest"], str(tmp_path / "dom"), MixingConfig(benchmarks=[]), str(out))
    assert not (tmp_path / "deep").exists()  # refused before anything was written, so nothing escaped
    with pytest.raises(ValueError):
        soup_uri(["..", "ok"])
    with pytest.raises(ValueError):
        parse_soup_uri("soup/..+ok")


# ---- the benchmark protocol end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_proxy_check_protocol_end_to_end(tmp_path):
    """Three demo domains, 2 steps per model, all 4 mixtures of >= 2 domains: every mixture gets a trained,
    a soup and an experts-mean score per domain, and the statistics are computed from them."""
    from core.mixing.proxy import ProxyCheckConfig, proxy_mixing_config, run_proxy_check

    mc = proxy_mixing_config(budget_steps=2, heldout_per_domain=3, batch_size=2, val_size=2)
    cfg = ProxyCheckConfig(mixing=mc, n_samples=80, domains=("chart", "counting", "document"), lm_steps=10,
                           base_steps=2, n_mixtures=0, n_boot=100)
    check = run_proxy_check(cfg, tmp_path)
    assert [r["subset"] for r in check.rows] == ["chart+counting", "chart+document", "counting+document",
                                                 "chart+counting+document"]
    assert len(set(check.sizes.values())) == 1  # balanced: every domain trains on the same number of samples
    for r in check.rows:
        for k in ("trained", "soup", "experts_mean"):
            assert sorted(r[k]) == ["nll_chart", "nll_counting", "nll_document"]
            assert all(math.isfinite(v) for v in r[k].values())
        assert r["steps"] == 2  # one expert's compute
    assert check.stats["soup"]["n"] == 4 and -1 <= check.stats["soup"]["rho"] <= 1
    assert not (tmp_path / "soups").exists() or os.listdir(tmp_path / "soups") == []  # soups deleted after scoring
