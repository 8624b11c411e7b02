"""A 2-variant ablation grid end to end with the small models (local execution): ingest, embed on Ray,
SemDeDup, export per variant, train per variant, capped evaluation, one comparison table."""

from __future__ import annotations

import os

import pandas as pd
import pytest


@pytest.mark.slow
def test_two_variant_grid_end_to_end(tmp_path, capsys):
    import ray
    from flytekit.types.file import FlyteFile

    from core.demo import generate_demo, load_ground_truth
    from core.demo.eval_fixtures import write_fixtures
    from core.foundation.configs import preset
    from core.runs.config import AblateConfig
    from workflows.ablate import ablate

    info = generate_demo(str(tmp_path / "data"), n_samples=48, seed=0)
    write_fixtures(str(tmp_path / "evals"))
    gt = load_ground_truth(str(tmp_path / "data"))  # known-bad ids: the planted duplicate copies
    bad = sorted(g[1] for g in gt["near_duplicate_groups"] + gt["exact_duplicate_groups"])
    (tmp_path / "bad.txt").write_text("\n".join(bad))
    try:
        out = ablate(
            source=str(info.data_json), image_root=str(info.images_dir), variants=["baseline", "semdedup@0.2"],
            eval_cache=str(tmp_path / "evals"), benchmarks=["countbench", "chartqa"],
            config=preset(AblateConfig, "tiny", ingest_config={"shard_max_samples": 20}, lm_steps=20, train_config={"max_steps": 3, "batch_size": 4,
                                                                                           "val_every_n_steps": 3},
                          eval_max_samples=2),
            known_bad_ids=FlyteFile(str(tmp_path / "bad.txt")),
        )
    finally:
        ray.shutdown()  # the embed task's local ray.init() is never shut down by flytekit
    table = pd.read_parquet(os.path.join(out.comparison.path, "comparison.parquet"))
    assert table["variant"].tolist() == ["baseline", "semdedup@0.2"]
    base, dedup = table.iloc[0], table.iloc[1]
    assert dedup["n_samples"] < base["n_samples"] and 0 < dedup["tokens_vs_baseline"] < 1
    assert {"countbench", "chartqa", "countbench_delta", "chartqa_delta"} <= set(table.columns)
    assert table[["countbench", "chartqa"]].notna().all().all()  # every variant was evaluated
    # the known-bad ids: the baseline keeps them all; each one the dedup variant removed is counted
    assert base["known_bad_removed"] == 0 and base["known_bad_kept"] == len(bad)
    assert dedup["known_bad_removed"] + dedup["known_bad_kept"] == len(bad)
    by_epoch = pd.read_parquet(os.path.join(out.comparison.path, "scores_by_epoch.parquet"))
    ckpts = by_epoch.groupby("variant")["checkpoint"].unique()
    assert set(ckpts["baseline"]).isdisjoint(ckpts["semdedup@0.2"])  # each variant trained its own model
    # the evaluation itself names each checkpoint's run by its variant (trainer_state.json run_name), so its
    # score-vs-step plot and results carry variant names, not the trainer's hashed output folders
    ev_table = pd.read_csv(os.path.join(out.evaluation.path, "results.csv"))
    assert set(ev_table["variant"]) == {"baseline", "semdedup@0.2", "baseline-seed1"}  # tiny preset: 2 baseline seeds
    # the paired comparison: each run vs the baseline over the same items, the second seed as the noise floor
    paired = pd.read_parquet(os.path.join(out.comparison.path, "paired.parquet"))
    nll = paired[(paired["metric"] == "answer_nll") & (paired["benchmark"] == "all")].set_index("variant")
    assert set(nll.index) == {"semdedup@0.2", "baseline-seed1"} and nll["n"].gt(0).all()
    assert nll["noise"].notna().all() and nll.loc["baseline-seed1", "verdict"] == "seed spread"
    assert set(paired["benchmark"]) == {"countbench", "chartqa", "all", "heldout"}
    assert table["answer_nll"].notna().all() and table["val_loss"].notna().all()

    # every step's deck page lands in the comparison's decks/ (shared steps, per-variant export and training,
    # evaluation, the table itself), and the run ends by printing their paths
    decks = os.path.join(out.comparison.path, "decks")
    names = sorted(f[: -len(".html")] for f in os.listdir(decks))
    assert names == sorted(["ingest", "embed", "semdedup", "export_baseline", "export_semdedup-0.2", "train_baseline",
                            "train_semdedup-0.2", "train_baseline-seed1", "evaluation", "ablation"])
    printed = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  deck ")]
    assert sorted(row[1] for row in printed) == names  # without output_dir: the task's own copies, which exist
    assert all(os.path.isfile(row[2]) and row[2].endswith(f"/decks/{row[1]}.html") for row in printed), printed
