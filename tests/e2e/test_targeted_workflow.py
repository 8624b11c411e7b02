"""`targeted_generation` end to end as a Flyte workflow (local execution, tiny CPU preset = the `targeted_demo`
plan's configs): ingest, tiny embeddings, pool decontamination, subgroups, retrieval, the capped generation map
on the run's CPU profile, filters, export of the named subset from the filters' StepOuts."""

from __future__ import annotations

import json
import os

import pytest

from core.io.ingest import IngestOptions


@pytest.mark.slow
def test_targeted_generation_end_to_end(tmp_path):
    from flytekit.types.file import FlyteFile

    from core.demo import generate_demo, plant_eval_contamination
    from core.demo.eval_fixtures import write_fixtures
    from core.foundation.configs import override
    from core.foundation.ledger import read_ledger, step_dir
    from core.targeted.filters import FILTER_STEPS
    from tests.tasks.test_profiles import plan_inputs
    from workflows.targeted import targeted_demo, targeted_generation

    cache = str(tmp_path / "eval_cache")
    write_fixtures(cache)
    pool = generate_demo(str(tmp_path / "pool"), 120, 0)
    plant_eval_contamination(str(tmp_path / "pool"), cache, ["countbench"], per_benchmark=1)
    ref = generate_demo(str(tmp_path / "reference"), 90, 1, corrupt=False)
    demo = plan_inputs(targeted_demo)
    cfg = override(demo["config"], budget_per_subgroup=4, shard_size=4)
    out = targeted_generation(reference_source=str(ref.data_json), reference_image_root=str(ref.images_dir),
                              pool_source=str(pool.data_json), pool_image_root=str(pool.images_dir),
                              reference_ids=FlyteFile(str(ref.ground_truth)), eval_cache=cache, benchmarks=["countbench"],
                              embed_config=demo["embed_config"], decontam_config=demo["decontam_config"],
                              config=cfg, tiny_vlm_steps=5, lm_steps=20,
                              ingest_config=IngestOptions(shard_max_samples=50))
    manifest = json.load(open(os.path.join(out.export.dir.path, "manifest.json")))
    assert out.export.step == "export" and manifest["subset"] == cfg.subset_name
    gen = read_ledger(step_dir(out.retrieved.path, "tg_retrieve"))
    assert 0 < int((gen["decision"] == "keep").sum()) <= 3 * cfg.budget_per_subgroup  # 3 subgroups in the preset
    filtered = {s: read_ledger(step_dir(out.filtered.path, s)) for s in FILTER_STEPS[1:]}
    kept = set(filtered[FILTER_STEPS[-1]].query("decision == 'keep'")["sample_id"])
    assert {i for sh in manifest["shards"] for i in sh["ids"]} == kept  # exactly what passed every filter
