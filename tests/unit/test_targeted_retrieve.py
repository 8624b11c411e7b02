"""Retrieval: per-subgroup budgets, no image used twice, decontaminated pool, one ledger row per candidate."""

import numpy as np
import pandas as pd
import pytest

from core.demo.embeddings import write_embedding_parquet
from core.foundation.ledger import passing_ids, read_ledger, step_dir
from core.steps.dedup.config import DecontamConfig
from core.steps.dedup.mining import decontaminate
from core.targeted.config import TargetedConfig
from core.targeted.retrieve import STEP, generated_id, retrieve

D = 16
GROUPS = ["chart", "count", "doc"]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture()
def world(tmp_path):
    rng = np.random.default_rng(0)
    dirs = _unit(rng.normal(size=(3, D)))
    ref_ids, ref_x, ref_rows = [], [], []
    for g, d in zip(GROUPS, dirs):
        for i in range(4):
            rid = f"r_{g}_{i}"
            ref_ids.append(rid)
            ref_x.append(d + 0.05 * rng.normal(size=D))
            ref_rows.append({"ref_id": rid, "subgroup": g, "used": True})
    ref_rows.append({"ref_id": "r_text", "subgroup": "", "used": False})  # unused rows are not queries
    (tmp_path / "ref_emb").mkdir()
    write_embedding_parquet(str(tmp_path / "ref_emb" / "ref-000000.parquet"), ref_ids, np.array(ref_x, np.float32), None)
    pool_ids, pool_x = [], []
    for g, d in zip(GROUPS, dirs):
        for i in range(10):
            pool_ids.append(f"p_{g}_{i:02d}")
            pool_x.append(d + (0.02 + 0.02 * i) * rng.normal(size=D))
    for i in range(6):  # contested: halfway between chart and count, wanted by both
        pool_ids.append(f"p_mix_{i}")
        pool_x.append(dirs[0] + dirs[1] + 0.02 * rng.normal(size=D))
    pool_x = np.array(pool_x, np.float32)
    (tmp_path / "pool_emb").mkdir()
    half = len(pool_ids) // 2
    write_embedding_parquet(str(tmp_path / "pool_emb" / "shard-000000.parquet"), pool_ids[:half], pool_x[:half], None)
    write_embedding_parquet(str(tmp_path / "pool_emb" / "shard-000001.parquet"), pool_ids[half:], pool_x[half:], None)
    return tmp_path, pd.DataFrame(ref_rows), pool_ids, pool_x


def _cfg(**kw):
    return TargetedConfig(model="m", budget_per_subgroup=kw.pop("budget", 5), oversample=kw.pop("oversample", 4),
                          shard_size=4, families={"count": "counting", "doc": "doc"}, **kw)


@pytest.mark.parametrize("mode", ["nearest", "centroid"])
def test_budget_and_uniqueness(world, mode):
    root, ref, pool_ids, _ = world
    got = retrieve(ref, root / "ref_emb", root / "pool_emb", root / f"out_{mode}", _cfg(retrieval=mode))
    assert got.groupby("subgroup").size().to_dict() == {g: 5 for g in GROUPS}
    assert got["pool_id"].is_unique and got["gen_id"].is_unique
    assert set(got["pool_id"]) <= set(pool_ids)
    assert (got["gen_id"] == got["pool_id"].map(generated_id)).all()
    assert got.loc[got.subgroup == "count", "family"].eq("counting").all()
    assert got.loc[got.subgroup == "chart", "family"].eq("chart").all()  # default family
    # each subgroup got images from its own direction (or the contested ones), never another group's
    for g in GROUPS:
        ids = got.loc[got.subgroup == g, "pool_id"]
        assert all(i.startswith((f"p_{g}_", "p_mix_")) for i in ids)
    assert got["gen_shard"].tolist() == [f"gen-{i // 4:06d}" for i in range(15)]
    # one ledger row per candidate: the retrieved ones kept with their subgroup, the rest dropped with a reason
    led = read_ledger(step_dir(root / f"out_{mode}", STEP))
    assert led["sample_id"].is_unique
    kept = led[led.decision == "keep"]
    assert set(kept["sample_id"]) == set(got["pool_id"])
    assert set(led.loc[led.decision == "drop", "reason"]) <= {"retrieval_over_budget"}
    assert (led.decision == "drop").sum() > 0


def test_contested_images_go_to_one_subgroup_only(world):
    root, ref, _, _ = world
    got = retrieve(ref, root / "ref_emb", root / "pool_emb", root / "out", _cfg(budget=14, oversample=3))
    mixed = got[got.pool_id.str.startswith("p_mix_")]
    assert len(mixed) == 6 and mixed["pool_id"].is_unique  # all taken, each by exactly one subgroup
    assert set(mixed["subgroup"]) <= {"chart", "count"}
    assert got.groupby("subgroup").size().max() <= 14


def test_budget_larger_than_pool_underfills(world):
    root, ref, pool_ids, _ = world
    got = retrieve(ref, root / "ref_emb", root / "pool_emb", root / "out", _cfg(budget=30, oversample=2))
    assert got["pool_id"].is_unique and len(got) == len(pool_ids)


def test_decontaminated_pool_images_are_never_retrieved(world):
    root, ref, pool_ids, pool_x = world
    cfg = _cfg(budget=3, oversample=2)
    before = retrieve(ref, root / "ref_emb", root / "pool_emb", root / "before", cfg)
    target = before.loc[before.subgroup == "doc", "pool_id"].iloc[0]  # the doc subgroup's best image
    # an eval test item that is a copy of it: the existing decontamination drops it from the pool
    (root / "eval").mkdir()
    write_embedding_parquet(str(root / "eval" / "docvqa-000000.parquet"), ["ev1"],
                            pool_x[[pool_ids.index(target)]], None)
    decontaminate(root / "pool_emb", root / "dc", {"docvqa": str(root / "eval" / "docvqa-000000.parquet")},
                  DecontamConfig(threshold=0.999, device="cpu"))
    dled = read_ledger(step_dir(root / "dc", "decontam"))
    assert dled.set_index("sample_id").loc[target, "reason"] == "eval_contamination:docvqa"
    allowed = passing_ids(dled)
    after = retrieve(ref, root / "ref_emb", root / "pool_emb", root / "after", cfg, allowed_ids=allowed)
    assert target not in set(after["pool_id"])
    assert target not in set(read_ledger(step_dir(root / "after", STEP))["sample_id"])
    assert after.groupby("subgroup").size().to_dict() == {g: 3 for g in GROUPS}  # budget refilled

