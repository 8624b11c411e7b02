"""`mixing_search` end to end on a small demo dataset (local execution, tiny models): 3 domains, 7 soups merged
in the eval workers, held-out loss and one benchmark, proxy mixtures trained, Spearman table, recommended
mixture exported with counts per domain, domain perplexity ledger."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from core.io.ingest import IngestOptions


@pytest.mark.slow
def test_mixing_search_end_to_end(tmp_path):
    from core.demo import generate_demo
    from core.demo.eval_fixtures import write_fixtures
    from core.foundation.ledger import read_ledger, step_dir
    from core.mixing.domains import field_domain_config
    from core.mixing.pipeline import tiny_mixing_config
    from workflows.mixing import mixing_search

    info = generate_demo(str(tmp_path / "data"), n_samples=120, seed=0)
    write_fixtures(str(tmp_path / "evals"))
    cfg = tiny_mixing_config(benchmarks=["countbench"], budget_steps=3, eval_max_samples=2, heldout_per_domain=3,
                             val_size=2, proxy_top=2, proxy_random=1)
    doms = ["chart", "counting", "document"]  # the demo records' `domain` field
    out = mixing_search(source=str(info.data_json), image_root=str(info.images_dir), eval_cache=str(tmp_path / "evals"),
                        config=cfg, domain_config=field_domain_config(include=doms), base_steps=3, lm_steps=20,
                        ingest_config=IngestOptions(shard_max_samples=50))
    soups = pd.read_csv(os.path.join(out.soups.path, "soup_scores.csv"), index_col=0)
    assert len(soups) == 7 and soups["overall"].notna().all()
    assert {"countbench", "nll_chart", "nll_counting", "nll_document"} <= set(soups.columns)
    analysis = json.load(open(os.path.join(out.soups.path, "analysis.json")))
    assert analysis["peak_soups_held"] >= 1 and analysis["peak_experts_held"] >= 1
    assert set(analysis["replay"]) == {"greedy", "beam", "surrogate"}
    proxy = pd.read_csv(os.path.join(out.report.path, "proxy_spearman.csv")).set_index("benchmark")
    assert (proxy["n_pairs"] == 3).all()
    manifest = json.load(open(os.path.join(out.recommended.path, "manifest.json")))
    best = analysis["best"]["overall"]["subset"]
    assert sorted(manifest["domain_counts"]) == sorted(best.split("+"))
    assert sum(manifest["domain_counts"].values()) == manifest["n_samples"] > 0
    led = read_ledger(step_dir(out.domain_perplexity.path, "perplexity"))
    assert len(led) > 0 and set(led["decision"]) <= {"keep", "quarantine"}
