"""Perplexity over WDS shards (ledger, scores, resume, missing inputs) and the filter/slice step."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppl_helpers import clean_records, garbled_records, samples, tiny_lm  # noqa: E402

from core.foundation.ledger import check_balance, read_ledger, step_dir  # noqa: E402
from core.foundation.sample import Sample  # noqa: E402
from core.foundation.step import Passing  # noqa: E402
from core.io.wds import list_shards, write_shards  # noqa: E402
from core.steps.perplexity import SliceConfig, read_scores, score_shards, slice_by_perplexity, tiny_perplexity_config  # noqa: E402
from core.steps.perplexity.report import score_report_html, slice_report_html  # noqa: E402


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory)


@pytest.fixture()
def run(tmp_path):
    recs = clean_records(40, seed=11, prefix="c") + garbled_records(5)
    recs.append({"id": "zero", "image": "z.jpg", "conversations": [
        {"from": "human", "value": "Show me."}, {"from": "gpt", "value": "<image>"}]})
    ss = samples(recs)
    data = png()
    for s in ss:
        s.image_bytes = [data] * len(s.images)
    write_shards(ss, str(tmp_path / "shards"), max_samples=16)
    return tmp_path, [s.id for s in ss]


def test_score_shards_ledger_scores_and_resume(lm, run):
    root, ids = run
    shards = list_shards(str(root / "shards"))
    assert len(shards) == 3
    out = root / "ppl"
    cfg = tiny_perplexity_config(lm)
    summary = score_shards(shards, out, cfg, prev=Passing.of(ids + ["ghost"]))
    led = read_ledger(step_dir(out, "perplexity"))
    assert sorted(led.sample_id) == sorted(ids + ["ghost"])
    q = led[led.decision == "quarantine"].set_index("sample_id").reason.to_dict()
    assert q == {"zero": "ppl_no_scored_tokens", "ghost": "missing_from_shard"}
    kept = led[led.decision == "keep"]
    assert len(kept) == len(ids) - 1 and kept.score.notna().all()
    sc = read_scores(out)
    assert len(sc) == len(ids) and set(sc.shard) == {Path(s).stem for s in shards}
    z = sc[sc.sample_id == "zero"].iloc[0]
    assert z.n_scored == 0 and pd.isna(z.ppl)
    assert summary["n_kept"] == len(ids) - 1 and summary["shards_scored"] == 3
    assert 0 <= summary["batching"]["padding_waste"] < 1
    json.loads((out / "perplexity" / "summary.json").read_text())
    # planted garbled answers have the highest perplexities
    worst = sc.sort_values("ppl", ascending=False).sample_id.head(5)
    assert all(w.startswith("g") for w in worst)

    # resume: only the shard whose ledger part is gone is scored again; results are identical
    parts = sorted(step_dir(out, "perplexity").glob("part-shard-*.parquet"))
    keep_mtime = parts[0].stat().st_mtime_ns
    parts[1].unlink()
    again = score_shards(shards, out, cfg, prev=Passing.of(ids + ["ghost"]))
    assert (again["shards_scored"], again["shards_skipped"]) == (1, 2)
    assert parts[0].stat().st_mtime_ns == keep_mtime
    led2 = read_ledger(step_dir(out, "perplexity"))
    assert sorted(led2.sample_id) == sorted(led.sample_id)
    merged = led.merge(led2, on="sample_id")
    assert ((merged.score_x - merged.score_y).abs().fillna(0) < 1e-9).all()

    html = score_report_html(out, summary)
    assert html.count("<img") == 3 and "highest perplexity" in html and "g000" in html


def test_reader_quarantine_lands_in_ledger(lm, run, tmp_path):
    import tarfile

    root, ids = run
    (root / "shards" / "shard-999998.tar").write_bytes(b"this is not a tar file" * 10)  # unreadable shard
    rec = json.dumps({"id": "bad1", "conversations": [{"from": "gpt", "value": "no question"},
                                                      {"from": "human", "value": "?"}]}).encode()
    with tarfile.open(root / "shards" / "shard-999999.tar", "w") as tf:
        ti = tarfile.TarInfo("bad1.json")
        ti.size = len(rec)
        tf.addfile(ti, io.BytesIO(rec))
    shards = list_shards(str(root / "shards"))
    out = tmp_path / "ppl2"
    inputs = ids + ["bad1", "lost"]
    score_shards(shards, out, tiny_perplexity_config(lm), prev=Passing.of(inputs))
    led = read_ledger(step_dir(out, "perplexity"))
    q = led[led.decision == "quarantine"].set_index("sample_id").reason.to_dict()
    assert q == {"zero": "ppl_no_scored_tokens", "bad1": "role_broken", "lost": "missing_from_shard"}
    check_balance([out], ["perplexity"], inputs=inputs)


def test_range_filter_and_slices(lm, run, tmp_path):
    root, ids = run
    out = root / "ppl"
    score_shards(list_shards(str(root / "shards")), out, tiny_perplexity_config(lm), prev=Passing.of(ids))
    rng = slice_by_perplexity(out, tmp_path / "f", SliceConfig(mode="range", low_pct=10, high_pct=90))
    led = read_ledger(step_dir(tmp_path / "f", "ppl_filter"))
    assert set(led.reason[led.decision == "drop"]) == {"ppl_above_p90", "ppl_below_p10"}
    n = len(ids) - 1
    assert rng["n_inputs"] == n
    assert abs(rng["counts"]["drop"] - 0.2 * n) <= 2
    kept = led[led.decision == "keep"].score
    assert kept.max() <= rng["ppl_high"] and kept.min() >= rng["ppl_low"]
    assert not any(i.startswith("g") for i in json.loads(Path(rng["kept_ids"]).read_text()))
    check_balance([out, tmp_path / "f"], ["perplexity", "ppl_filter"], inputs=ids)

    res = slice_by_perplexity(out, tmp_path / "s", SliceConfig(mode="slices", n_slices=4))
    sizes = [s["n"] for s in res["slices"]]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    lists = [json.loads(Path(s["ids"]).read_text()) for s in res["slices"]]
    assert sorted(sum(lists, [])) == sorted(set(ids) - {"zero"})
    assert all(a["ppl_max"] <= b["ppl_min"] for a, b in zip(res["slices"], res["slices"][1:]))
    assert all(i.startswith("g") for i in lists[-1][-5:]) or {f"g{i:04d}" for i in range(5)} <= set(lists[-1])
    check_balance([out, tmp_path / "s"], ["perplexity", "ppl_filter"], inputs=ids)
    assert "<img" in slice_report_html(tmp_path / "s", res) and "<img" in slice_report_html(tmp_path / "f", rng)


def test_vlm_mode_takes_any_vlm_scorer(lm, run):
    from core.steps.perplexity import PerplexityConfig, VLMScorer
    from core.steps.perplexity.scorer import SampleScore

    root, ids = run

    class CountingVLM:  # a minimal scorer: proves the interface receives samples with image bytes loaded
        def score(self, batch: list[Sample]) -> list[SampleScore]:
            assert all(len(s.image_bytes) == len(s.images) for s in batch)
            return [SampleScore(s.id, 1.0, 2.718281828, 1, 1, False) for s in batch]

    assert isinstance(CountingVLM(), VLMScorer)
    out = root / "v"
    score_shards(list_shards(str(root / "shards")), out, PerplexityConfig(model=lm, mode="vlm"), scorer=CountingVLM())
    assert (read_ledger(step_dir(out, "perplexity")).decision == "keep").sum() == len(ids)


def test_shrinkage_keeps_one_token_answers_out_of_the_extremes(tmp_path):
    from core.foundation.ledger import LedgerWriter
    from core.steps.perplexity.slices import ranking_values

    nll = np.array([9.0, 6.0, 1.0, 1.2])
    n = np.array([1.0, 60.0, 20.0, 30.0])
    raw = ranking_values(nll, n, 0)
    assert np.allclose(raw, np.exp(nll))
    shrunk = ranking_values(nll, n, 10)
    assert raw.argmax() == 0 and shrunk.argmax() == 1  # the long bad answer outranks the lone noisy token
    prior = (nll * n).sum() / n.sum()
    assert math.isclose(math.log(shrunk[0]), (9.0 + 10 * prior) / 11)
    part = step_dir(tmp_path / "p", "perplexity") / "part-x.parquet"
    with LedgerWriter(part, "perplexity") as w:
        for i, (a, b) in enumerate(zip(nll, n)):
            w.add(f"s{i}", "keep", score=math.exp(a), shard="x", nll=a, n_scored=int(b))
    for k, dropped in ((0, "s0"), (10, "s1")):
        res = slice_by_perplexity(tmp_path / "p", tmp_path / f"f{k}",
                                  SliceConfig(mode="range", high_pct=75, shrink_tokens=k))
        led = read_ledger(step_dir(tmp_path / f"f{k}", "ppl_filter"))
        assert led[led.decision == "drop"].sample_id.tolist() == [dropped], res
