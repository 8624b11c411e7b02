"""Embedding loader, the run-directory pipeline (ledger, resume, report) and mining / decontamination."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.demo.embeddings import clustered_embeddings, plant_duplicates, write_embedding_parquet
from core.foundation.ledger import LedgerWriter, check_balance, read_ledger, step_dir
from core.foundation.step import Passing, StepMismatch
from core.steps.dedup.config import DecontamConfig, SemDedupConfig
from core.steps.dedup.embeddings import load_embeddings, read_embeddings
from core.steps.dedup.mining import decontaminate, mine_neighbours
from core.steps.dedup.pipeline import cluster_embeddings, decide_semdedup, prune_cluster_group, run_semdedup
from core.steps.dedup.report import semdedup_report_html


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_load_embeddings_list_and_fixed_size_columns(tmp_path, fixed, dtype):
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    ids = [f"a{i}" for i in range(5)]
    write_embedding_parquet(str(tmp_path / "shard-000001.parquet"), ids, img, txt, fixed=fixed, dtype=dtype)
    got_ids, m = load_embeddings(tmp_path, "image")
    assert got_ids == ids and m.dtype == np.float32 and m.shape == (5, 6)
    np.testing.assert_allclose(m, img, rtol=1e-3 if dtype == "float16" else 0, atol=1e-3 if dtype == "float16" else 0)
    _, t = load_embeddings(tmp_path, "text")
    assert t.shape == (5, 4)
    _, jc = load_embeddings(tmp_path, "joint_concat")
    assert jc.shape == (5, 10)
    np.testing.assert_allclose(np.linalg.norm(jc[:, :6], axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="joint_mean needs equal"):
        load_embeddings(tmp_path, "joint_mean")


def test_embed_step_output_dir_is_accepted(tmp_path):
    """The embed step returns <out>/embed/<shard>.parquet + <out>/ledger/embed/: only the former are read."""
    rng = np.random.default_rng(2)
    (tmp_path / "embed").mkdir()
    write_embedding_parquet(str(tmp_path / "embed" / "shard-000000.parquet"), ["a", "b"], rng.standard_normal((2, 3)),
                            None, fixed=True, dtype="float16")
    with LedgerWriter(step_dir(tmp_path, "embed") / "part-shard-000000.parquet", "embed") as led:
        led.add("a", "keep")
        led.add("b", "keep")
    es = read_embeddings(tmp_path, "image")
    assert es.ids == ["a", "b"] and es.shards == ["shard-000000", "shard-000000"]


def test_read_embeddings_reports_missing_and_filters(tmp_path):
    rng = np.random.default_rng(1)
    ids = ["x0", "x1", "x2", "x3"]
    write_embedding_parquet(str(tmp_path / "s0.parquet"), ids[:2], rng.standard_normal((2, 3)), rng.standard_normal((2, 3)))
    write_embedding_parquet(str(tmp_path / "s1.parquet"), ids[2:], rng.standard_normal((2, 3)),
                            rng.standard_normal((2, 3)), null_image={"x3"})
    es = read_embeddings(tmp_path, "image")
    assert es.ids == ["x0", "x1", "x2"] and es.missing == ["x3"] and es.shards == ["s0", "s0", "s1"]
    with pytest.raises(ValueError, match="x3"):
        load_embeddings(tmp_path, "image")
    assert read_embeddings(tmp_path, "image", include_ids={"x1", "x3"}).ids == ["x1"]
    jm = read_embeddings(tmp_path, "joint_mean")
    assert jm.missing == ["x3"] and jm.matrix.shape == (3, 3)



class _CountingSet(frozenset):
    """A frozenset that counts how often it is walked whole (iterated) and probed (`in`)."""

    walks = probes = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()

    def __contains__(self, x):
        type(self).probes += 1
        return super().__contains__(x)


def test_read_embeddings_probes_the_include_set_per_row_never_walks_it(tmp_path):
    """The include set is every passing id of the run (12M at scale) and every decontam file reads with it:
    a file costs one hash probe per row, not a walk or sort of the whole set (np.isin(ids, list(set)) sorted
    all 12M ids for every file: ~0.1 s per file at 100k ids, ~20 s at 12M)."""
    rng = np.random.default_rng(3)
    for f in range(3):
        ids = [f"s{f}_{i}" for i in range(4)]
        write_embedding_parquet(str(tmp_path / f"s{f}.parquet"), ids, rng.standard_normal((4, 3)), None)
    include = _CountingSet([f"s{f}_{i}" for f in range(3) for i in (0, 2)] + [f"other{i}" for i in range(1000)])
    _CountingSet.walks = _CountingSet.probes = 0
    es = read_embeddings(tmp_path, "image", include_ids=include)
    assert es.ids == ["s0_0", "s0_2", "s1_0", "s1_2", "s2_0", "s2_2"]
    assert _CountingSet.walks == 0 and _CountingSet.probes == 12
    assert read_embeddings(tmp_path, "image", include_ids=["s1_3"]).ids == ["s1_3"]  # any iterable still works

def _write_run(tmp_path, n=1200, bad=True):
    x = clustered_embeddings(n, 24, 8, seed=5, spread=0.8)
    x, ids, planted = plant_duplicates(x, 30, 30, noise=0.05, seed=6)
    if bad:
        x[0, 0] = np.nan
        x[1] = 0
    emb = tmp_path / "embed"
    emb.mkdir()
    half = len(ids) // 2
    txt = np.ones((len(ids), 4), np.float32)
    write_embedding_parquet(str(emb / "shard-000000.parquet"), ids[:half], x[:half], txt[:half])
    write_embedding_parquet(str(emb / "shard-000001.parquet"), ids[half:], x[half:], txt[half:],
                            null_image={ids[-1]})
    run = tmp_path / "run"
    with LedgerWriter(step_dir(run, "ingest") / "part-0.parquet", "ingest") as led:
        for i in ids + ["ghost"]:
            led.add(i, "keep")
    return emb, run, ids, planted


def test_pipeline_writes_balanced_ledger_and_quarantines_bad_rows(tmp_path):
    emb, run, ids, planted = _write_run(tmp_path)
    c = SemDedupConfig(n_clusters=8, target_removal=0.05, kmeans_iters=8, chunk_size=64, cluster_groups=3,
                       device="cpu", sweep_subsample=600)
    summary = run_semdedup(emb, run, c, Passing.read(run, "ingest"))
    led = read_ledger(step_dir(run, "semdedup"))
    bal = check_balance(run, ["ingest", "semdedup"])[1]
    assert bal.inputs == len(ids) + 1
    q = led[led.decision == "quarantine"].set_index("sample_id")["reason"].to_dict()
    assert q == {ids[0]: "nan_or_inf_embedding", ids[1]: "zero_norm_embedding", "ghost": "missing_embedding"}
    skipped = led[led.reason.str.startswith("semdedup_skipped")]
    assert skipped.sample_id.tolist() == [ids[-1]] and skipped.decision.tolist() == ["keep"]
    n_deduped = len(ids) - 3
    assert summary["n_deduped"] == n_deduped
    dropped = led[led.decision == "drop"]
    assert len(dropped) == int(np.floor(0.05 * n_deduped + 0.5)) and set(dropped.reason) == {"semdedup"}
    extra = [json.loads(e) for e in dropped.extra]
    assert all(e["neighbour_id"] and e["cluster"] >= 0 for e in extra)
    assert dropped.score.min() > summary["threshold"]
    assert [r["k"] for r in summary["sweep"]] and len(summary["curve"]["eps"]) == len(summary["curve"]["removed_fraction"])
    html = semdedup_report_html(summary, fetch=lambda want: {})
    assert "Removal vs eps" in html and "Most similar removed pairs" in html and "data:image/png;base64" in html


def test_pipeline_resume_and_eps_rerun(tmp_path):
    emb, run, ids, planted = _write_run(tmp_path, bad=False)
    c = SemDedupConfig(n_clusters=6, eps=0.01, kmeans_iters=8, chunk_size=64, cluster_groups=2, device="cpu",
                       sweep_subsample=0)
    plan = cluster_embeddings(emb, run, c)
    first = prune_cluster_group(plan.group_files[0], c)
    mtime = pq.ParquetFile(first).metadata.num_rows, (run / "semdedup" / "scores").stat().st_mtime_ns
    assert prune_cluster_group(plan.group_files[0], c) == first  # resumed, not recomputed
    with pytest.raises(FileNotFoundError, match="no scores"):
        decide_semdedup(run, c)
    for g in plan.group_files[1:]:
        prune_cluster_group(g, c)
    assert (run / "semdedup" / "scores").stat().st_mtime_ns >= mtime[1]
    s1 = decide_semdedup(run, c)
    led = read_ledger(step_dir(run, "semdedup"))
    assert set(led[led.decision == "drop"].reason) == {"semdedup_eps"}
    removed = set(led[led.decision == "drop"].sample_id)
    planted.pop(ids[-1])  # its image embedding is null: skipped, not deduplicated
    members = set(planted) | set(planted.values())
    assert removed <= members and len(removed) == len(planted)  # eps=0.01 finds exactly the planted pairs
    # a new eps is only a new threshold: same scores, ledger replaced (not appended)
    c2 = SemDedupConfig(n_clusters=6, eps=0.3, kmeans_iters=8, device="cpu", sweep_subsample=0)
    s2 = decide_semdedup(run, c2)
    assert s2["n_removed"] > s1["n_removed"] and len(read_ledger(step_dir(run, "semdedup"))) == len(ids)


def test_pipeline_on_invalid_error(tmp_path):
    emb, run, ids, _ = _write_run(tmp_path)
    c = SemDedupConfig(n_clusters=4, eps=0.1, device="cpu", on_invalid="error", sweep_subsample=0)
    with pytest.raises(ValueError, match=ids[0]):
        cluster_embeddings(emb, run, c)


def _eval_world():
    rng = np.random.default_rng(7)
    train = rng.standard_normal((300, 16)).astype(np.float32)
    ev = rng.standard_normal((5, 16)).astype(np.float32)
    train[10] = ev[0] * 3.0  # same direction: similarity 1
    train[20] = ev[1] + 0.01 * rng.standard_normal(16)  # near copy
    tids = [f"t{i:03d}" for i in range(300)]
    eids = [f"e{i}" for i in range(5)]
    return tids, train, eids, ev


def test_mine_neighbours_matches_brute_force():
    tids, train, eids, ev = _eval_world()
    t = mine_neighbours(eids, ev, tids, train, k=3, benchmark="docvqa").to_pandas()
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    en = ev / np.linalg.norm(ev, axis=1, keepdims=True)
    s = en @ tn.T
    for q, e in enumerate(eids):
        got = t[t.eval_id == e].sort_values("rank")
        assert got.sample_id.tolist() == [tids[i] for i in np.argsort(-s[q])[:3]]
        np.testing.assert_allclose(got.similarity, np.sort(s[q])[::-1][:3], rtol=1e-5)
    assert t[t.eval_id == "e0"].sample_id.iloc[0] == "t010"
    assert set(t.benchmark) == {"docvqa"}


def test_decontaminate_drops_near_copies_with_benchmark_reason(tmp_path):
    tids, train, eids, ev = _eval_world()
    emb = tmp_path / "embed"
    emb.mkdir()
    write_embedding_parquet(str(emb / "shard-0.parquet"), tids[:150], train[:150], None)
    write_embedding_parquet(str(emb / "shard-1.parquet"), tids[150:], train[150:], None)
    write_embedding_parquet(str(tmp_path / "docvqa.parquet"), eids[:2], ev[:2], None)
    write_embedding_parquet(str(tmp_path / "chartqa.parquet"), eids[2:], ev[2:], None)
    run = tmp_path / "run"
    c = DecontamConfig(threshold=0.95, k=4)
    counts = decontaminate(emb, run, {"docvqa": str(tmp_path / "docvqa.parquet"),
                                      "chartqa": str(tmp_path / "chartqa.parquet")}, c)
    led = read_ledger(step_dir(run, "decontam"))
    drops = led[led.decision == "drop"].set_index("sample_id")
    assert set(drops.index) == {"t010", "t020"}
    assert set(drops.reason) == {"eval_contamination:docvqa"} and (drops.score > 0.95).all()
    assert json.loads(drops.loc["t010", "extra"])["eval_id"] == "e0"
    assert counts["n_dropped"] == 2 and len(led) == 300 and led.sample_id.is_unique
    mined = pa.concat_tables([pq.read_table(run / "mining" / f"{b}.parquet") for b in ("docvqa", "chartqa")])
    assert mined.num_rows == 5 * 4
    # resume: existing ledger parts are kept, mining is still complete
    decontaminate(emb, run, {"docvqa": str(tmp_path / "docvqa.parquet"),
                             "chartqa": str(tmp_path / "chartqa.parquet")}, c)
    assert len(read_ledger(step_dir(run, "decontam"))) == 300
    # parts decided against two eval sets are not resumed against one (the step stamp, core/foundation/step.py)
    with pytest.raises(StepMismatch, match="eval_embeddings.chartqa"):
        decontaminate(emb, run, {"docvqa": str(tmp_path / "docvqa.parquet")}, c)


def test_decontam_quarantines_absent_ids_and_resumes_one_file(tmp_path):
    """DecontamStep on the shard-step base: ids of `prev` found in no embeddings file are quarantined once;
    a rerun decides only the file whose ledger part is gone, while mining still sees every file."""
    tids, train, eids, ev = _eval_world()
    emb = tmp_path / "embed"
    emb.mkdir()
    write_embedding_parquet(str(emb / "shard-0.parquet"), tids[:150], train[:150], None)
    write_embedding_parquet(str(emb / "shard-1.parquet"), tids[150:], train[150:], None)
    write_embedding_parquet(str(tmp_path / "docvqa.parquet"), eids, ev, None)
    prev = Passing.of(tids[:290] + ["ghost"])  # t290..t299 did not pass the previous step
    evals, c = {"docvqa": str(tmp_path / "docvqa.parquet")}, DecontamConfig(threshold=0.95, k=3, device="cpu")
    counts = decontaminate(emb, tmp_path / "dc", evals, c, prev)
    ldir = step_dir(tmp_path / "dc", "decontam")
    led = read_ledger(ldir).set_index("sample_id")
    assert set(led.index) == set(tids[:290]) | {"ghost"} and led.loc["ghost", "reason"] == "missing_embedding"
    assert counts == {"n_input": 290, "n_dropped": 2, "n_quarantined": 1, "by_benchmark": {"docvqa": 2}}
    mined = pq.read_table(tmp_path / "dc" / "mining" / "docvqa.parquet").to_pandas()
    assert not set(mined.sample_id) & set(tids[290:])  # ids the previous step removed are never mined
    (ldir / "part-shard-1.parquet").unlink()
    again = decontaminate(emb, tmp_path / "dc", evals, c, prev)
    assert again["n_input"] == 140 and again["n_quarantined"] == 0  # ghost's row is still there: not written twice
    assert read_ledger(ldir).sample_id.tolist() == read_ledger(ldir).sample_id.drop_duplicates().tolist()
    assert sorted(p.name for p in ldir.iterdir()) == ["_step.json", "part-shard-0.parquet", "part-shard-1.parquet",
                                                      "part-zz-missing.parquet"]
    pd_again = pq.read_table(tmp_path / "dc" / "mining" / "docvqa.parquet").to_pandas()
    assert pd_again.equals(mined)
