"""Ablation variants: parsing, selection from ledgers (isolation), and the comparison (table, export counts,
known-bad columns, files, deck page sources)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from core.foundation.ledger import LedgerError, LedgerWriter, step_dir
from core.runs.ablation import parse_variant, select_variant
from core.runs.ablation_compare import compare_variants, comparison_html, comparison_table

IDS = [f"s{i:02d}" for i in range(20)]


def _ledger(run, step, rows):
    with LedgerWriter(step_dir(run, step) / "part-0.parquet", step) as led:
        for sid, decision, reason, score, extra in rows:
            led.add(sid, decision, reason, score=score, **extra)


@pytest.fixture()
def run(tmp_path):
    _ledger(tmp_path, "ingest", [(i, "keep", "", None, {}) for i in IDS] + [("bad", "quarantine", "corrupt_image", None, {})])
    _ledger(tmp_path, "embed", [(i, "keep", "", None, {}) for i in IDS])
    # M: first member of each of 4 clusters has none (NaN); the rest increase with the index
    m = [float("nan") if i % 5 == 0 else i / 20 for i in range(20)]
    _ledger(tmp_path, "semdedup", [(sid, "keep", "", s, {"cluster": i % 4}) for i, (sid, s) in enumerate(zip(IDS, m))])
    # perplexity: nll grows with the index, 20 scored tokens each
    _ledger(tmp_path, "perplexity", [(sid, "keep", "", math.exp(i / 10), {"nll": i / 10, "n_scored": 20})
                                     for i, sid in enumerate(IDS)])
    return tmp_path


@pytest.mark.parametrize("spec,kind,args", [("baseline", "baseline", ()), ("semdedup@0.1", "semdedup", (0.1,)),
                                            ("ppl@0-90", "ppl", (0.0, 90.0)), ("ppl_decile@3", "ppl_decile", (3.0,)),
                                            ("semdedup_eps@0.05", "semdedup_eps", (0.05,)), ("rephrased", "rephrased", ())])
def test_parse_variant(spec, kind, args):
    v = parse_variant(spec)
    assert (v.kind, v.args) == (kind, args) and "@" not in v.name


@pytest.mark.parametrize("bad", ["nope", "semdedup", "semdedup@2", "ppl@90-10", "ppl_decile@11", "baseline@1", "ppl@5"])
def test_parse_variant_rejects(bad):
    with pytest.raises(ValueError):
        parse_variant(bad)


def test_baseline_is_embed_passing(run):
    assert select_variant(parse_variant("baseline"), [run]) == IDS


def test_semdedup_target_removes_highest_m_exactly(run):
    ids = select_variant(parse_variant("semdedup@0.2"), [run])
    assert len(ids) == 16  # round(0.2 * 20) removed
    assert set(IDS) - set(ids) == {"s19", "s18", "s17", "s16"}  # the four largest M
    eps_ids = select_variant(parse_variant("semdedup_eps@0.2"), [run])  # remove M > 0.8
    assert set(IDS) - set(eps_ids) == {"s17", "s18", "s19"}


def test_ppl_range_and_deciles(run):
    keep = select_variant(parse_variant("ppl@0-50"), [run])
    assert keep == IDS[: len(keep)] and 9 <= len(keep) <= 11
    d1 = select_variant(parse_variant("ppl_decile@1"), [run])
    d10 = select_variant(parse_variant("ppl_decile@10"), [run])
    assert d1 == ["s00", "s01"] and d10 == ["s18", "s19"]


def test_variant_must_be_computed_in_isolation(tmp_path, run):
    _ledger(tmp_path / "other", "semdedup", [("zz", "keep", "", 0.5, {})])
    with pytest.raises(LedgerError, match="isolation"):
        select_variant(parse_variant("semdedup@0.1"), [tmp_path / "other", run])  # its semdedup saw other ids


def test_comparison_table_deltas():
    summary = pd.DataFrame([
        {"checkpoint": "b/e1", "benchmark": "docvqa", "score": 0.1},
        {"checkpoint": "b/e2", "benchmark": "docvqa", "score": 0.3},
        {"checkpoint": "d/e2", "benchmark": "docvqa", "score": 0.4},
        {"checkpoint": "b/e2", "benchmark": "chartqa", "score": 0.2},
        {"checkpoint": "d/e2", "benchmark": "chartqa", "score": 0.1},
    ])
    table, long = comparison_table(["baseline", "semdedup@0.1"], [["b/e1", "b/e2"], ["d/e2"]], summary,
                                   [{"n_samples": 100, "n_tokens": 1000}, {"n_samples": 90, "n_tokens": 800}])
    row = table.set_index("variant").loc["semdedup@0.1"]
    assert row["docvqa"] == pytest.approx(0.4) and row["docvqa_delta"] == pytest.approx(0.1)
    assert row["chartqa_delta"] == pytest.approx(-0.1) and row["tokens_vs_baseline"] == pytest.approx(0.8)
    assert table.set_index("variant").loc["baseline", "docvqa"] == pytest.approx(0.3)  # final epoch, not the first
    assert set(long["variant"]) == {"baseline", "semdedup@0.1"}
    json.dumps(table.to_dict("records"))


def test_compare_variants_counts_exports_and_known_bad(tmp_path):
    from core.io.wds import write_shards
    from tests.embed_data import sample

    ids = {"baseline": ["a", "b", "c", "d"], "semdedup@0.5": ["a", "c"]}
    exports = []
    for v, keep in ids.items():
        write_shards([sample(i, [], question="What is shown?", answer="Shapes.") for i in keep],
                     str(tmp_path / v / "shards"))
        exports.append(str(tmp_path / v))
    ev = tmp_path / "eval"
    ev.mkdir()
    row = {"benchmark": "docvqa", "metric": "anls", "status": "ok", "step": 3, "epoch": 1.0}
    pd.DataFrame([{**row, "checkpoint": "b/e1", "variant": "baseline", "score": 0.2},
                  {**row, "checkpoint": "d/e1", "variant": "semdedup", "score": 0.5}]
                 ).to_parquet(ev / "summary.parquet", index=False)
    out = tmp_path / "out"
    cmp = compare_variants(list(ids), [["b/e1"], ["d/e1"]], exports, str(ev), str(out), known_bad=["b", "c", "zz"])
    t = cmp.table.set_index("variant")
    per_sample = len("What is shown?\nShapes.") // 4  # no tokenizer: characters / 4
    assert t["n_samples"].tolist() == [4, 2] and t["n_tokens"].tolist() == [4 * per_sample, 2 * per_sample]
    assert t["known_bad_kept"].tolist() == [2, 1] and t["known_bad_removed"].tolist() == [0, 1]  # "b" removed
    assert t.loc["semdedup@0.5", "docvqa_delta"] == pytest.approx(0.3)
    assert pd.read_csv(out / "comparison.csv")["variant"].tolist() == list(ids)
    assert pd.read_parquet(out / "comparison.parquet").equals(cmp.table)
    assert set(pd.read_parquet(out / "scores_by_epoch.parquet")["variant"]) == set(ids)
    html = comparison_html(cmp)
    assert "scores by variant" in html and "semdedup@0.5" in html
