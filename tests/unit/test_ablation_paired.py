"""The ablation's paired comparison (core/runs/ablation_compare.py): per variant x benchmark x metric, the paired delta
to the baseline with its interval, the baseline seeds' noise floor and the verdict, on synthetic per-item eval
records whose answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.runs.ablation_compare import (
    compare_variants,
    comparison_html,
    format_paired,
    paired_comparison,
    seed_run_name,
)

N = 24


def _records(ckpt: str, nll: np.ndarray, score: np.ndarray, bench: str = "docvqa") -> list[dict]:
    return [{"checkpoint": ckpt, "benchmark": bench, "sample_id": f"{bench}-{i}", "score": float(score[i]),
             "answer_nll": float(nll[i]), "mc_correct": float("nan"), "mc_gold_prob": float("nan")}
            for i in range(len(nll))]  # fmt: skip


@pytest.fixture()
def grid(tmp_path):
    """baseline, a second baseline seed (shifted by +0.10), a variant 0.6 better on answer NLL, one identical to
    the baseline, one 0.05 better (consistent, so significant over items, but inside the seed spread)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(2.0, 4.0, N)
    score = np.zeros(N)
    runs = {
        "b/e1": base,
        "s/e1": base + 0.10 + rng.normal(0, 0.02, N),
        "clean/e1": base - 0.6 + rng.normal(0, 0.1, N),
        "same/e1": base.copy(),
        "tiny/e1": base - 0.05 + rng.normal(0, 0.005, N),
    }
    recs = [r for ck, nll in runs.items() for r in _records(ck, nll, score)]
    recs += [r for ck, nll in runs.items() for r in _records(ck, nll[:8] + 1, score[:8], bench="chartqa")]
    ev = tmp_path / "eval"
    ev.mkdir()
    pd.DataFrame(recs).to_parquet(ev / "records.parquet", index=False)
    variants = ["baseline", "ppl@0-90", "decontam", "semdedup@0.1"]
    ckpts = [["b/e0", "b/e1"], ["clean/e1"], ["same/e1"], ["tiny/e1"]]
    return variants, ckpts, str(ev), [["s/e1"]]


def test_verdicts_follow_the_known_answer(grid):
    variants, ckpts, ev, seeds = grid
    p = paired_comparison(variants, ckpts, ev, seeds, val_losses={"baseline": 1.0, "ppl@0-90": 0.7,
                                                                  seed_run_name(1): 1.05})
    nll = p[(p["benchmark"] == "docvqa") & (p["metric"] == "answer_nll")].set_index("variant")
    assert nll.loc["ppl@0-90", "verdict"] == "significant, outside noise: better"
    assert nll.loc["ppl@0-90", "delta"] == pytest.approx(-0.6, abs=0.05)
    assert nll.loc["ppl@0-90", "ci_lo"] < -0.6 < nll.loc["ppl@0-90", "ci_hi"] < 0
    assert nll.loc["decontam", "verdict"] == "not significant" and nll.loc["decontam", "delta"] == 0
    assert nll.loc["semdedup@0.1", "significant"] and nll.loc["semdedup@0.1", "verdict"] == "within noise"
    assert nll.loc["ppl@0-90", "noise"] == pytest.approx(0.10, abs=0.02)  # the spread of the two baseline seeds
    assert nll.loc[seed_run_name(1), "verdict"] == "seed spread"
    assert not nll["higher_is_better"].any() and nll.loc["ppl@0-90", "better"]
    pooled = p[(p["benchmark"] == "all")].set_index("variant")
    assert pooled.loc["ppl@0-90", "n"] == N + 8 and pooled["metric"].eq("answer_nll").all()
    # the published score is there too (all zeros here: never significant), mc_acc only where items have it
    score = p[(p["metric"] == "score") & (p["benchmark"] == "docvqa")].set_index("variant")
    assert not score["significant"].any() and "mc_acc" not in set(p["metric"])
    held = p[p["benchmark"] == "heldout"].set_index("variant")
    assert held.loc["ppl@0-90", "delta"] == pytest.approx(-0.3) and held.loc["ppl@0-90", "noise"] == pytest.approx(0.05)
    assert held.loc["ppl@0-90", "verdict"] == "outside noise (unpaired): better" and math.isnan(held["ci_lo"].iloc[0])
    text = format_paired(p)
    assert "significant, outside noise: better" in text and "within noise" in text


def test_one_baseline_seed_has_no_noise_floor(grid):
    variants, ckpts, ev, _ = grid
    p = paired_comparison(variants, ckpts, ev)
    row = p[(p["benchmark"] == "docvqa") & (p["metric"] == "answer_nll")].set_index("variant").loc["ppl@0-90"]
    assert math.isnan(row["noise"]) and row["verdict"] == "significant (no noise floor: one baseline seed)"
    assert paired_comparison(["ppl@0-90"], ckpts[1:2], ev).empty  # no baseline, nothing to pair with


def test_compare_variants_writes_paired_tables_and_headline_columns(grid, tmp_path):
    from core.io.wds import write_shards
    from tests.embed_data import sample

    variants, ckpts, ev, seeds = grid
    exports = []
    for v in variants:
        write_shards([sample(f"{v}-{i}", [], question="Q?", answer="A.") for i in range(3)],
                     str(tmp_path / v.replace("@", "-") / "shards"))
        exports.append(str(tmp_path / v.replace("@", "-")))
    pd.DataFrame([{"checkpoint": c[-1], "benchmark": "docvqa", "score": 0.0, "status": "ok", "step": 1, "epoch": 1.0,
                   "metric": "anls", "variant": v} for v, c in zip(variants, ckpts)]
                 ).to_parquet(tmp_path / "eval" / "summary.parquet", index=False)  # fmt: skip
    metrics = []
    for k, loss in enumerate([1.0, 0.8, 1.0, 1.0, 1.1]):
        f = tmp_path / f"m{k}.jsonl"
        f.write_text(json.dumps({"step": 5, "val_loss": 9.0}) + "\n" + json.dumps({"step": 10, "val_loss": loss}) + "\n")
        metrics.append(str(f))
    out = tmp_path / "out"
    cmp = compare_variants(variants, ckpts, exports, ev, str(out), seed_checkpoints=seeds,
                           train_metrics=metrics[:4], seed_train_metrics=metrics[4:])
    t = cmp.table.set_index("variant")
    assert t.loc["ppl@0-90", "answer_nll_verdict"] == "significant, outside noise: better"
    assert t.loc["baseline", "answer_nll_verdict"] == "reference" and t.loc["baseline", "answer_nll_delta"] == 0
    assert t.loc["ppl@0-90", "val_loss"] == pytest.approx(0.8) and t.loc["ppl@0-90", "val_loss_delta"] == pytest.approx(-0.2)
    assert pd.read_parquet(out / "paired.parquet").equals(cmp.paired)
    assert set(pd.read_csv(out / "paired.csv")["variant"]) == {"ppl@0-90", "decontam", "semdedup@0.1", seed_run_name(1)}
    html = comparison_html(cmp)
    assert "seed-to-seed spread" in html and "paired difference to the baseline" in html


def test_deck_escapes_data_derived_names(grid):
    """A benchmark named with HTML and mathtext in it is text in the deck: escaped, and not parsed as math (an
    unknown TeX command would make matplotlib raise when it draws the label)."""
    from core.runs.ablation_compare import Comparison

    variants, ckpts, ev, seeds = grid
    p = paired_comparison(variants, ckpts, ev, seeds)
    p.loc[p["benchmark"] == "docvqa", "benchmark"] = r"<b>$\notacommand{x}$</b>"
    long = pd.DataFrame([{"checkpoint": "b/e1", "benchmark": r"$\alsonot$", "score": 0.1, "variant": "baseline",
                          "status": "ok", "step": 1, "epoch": 1.0, "metric": "m", "score_stderr": 0.0}])
    table = pd.DataFrame([{"variant": "baseline", r"$\alsonot$": 0.1}])
    html = comparison_html(Comparison(table, long, p))
    assert "&lt;b&gt;" in html and "<b>$" not in html
