"""The one filter task (tasks/filters.py) run locally on an ingested demo run: any registered filter by name."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from core.foundation.ledger import check_balance, passing_ids, read_ledger, step_dir
from core.io.wds import iter_samples, list_shards


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from core.demo import generate_demo
    from core.io.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("filters_demo")
    generate_demo(str(root / "data"), n_samples=40, seed=0)
    ingest(IngestConfig(source=str(root / "data" / "data.json"), image_root=str(root / "data" / "images"),
                        run_dir=str(root / "run"), shard_max_samples=15))
    return root / "run"


def short_sides(run: Path) -> dict[str, int]:
    from PIL import Image

    return {s.id: min(min(Image.open(io.BytesIO(b)).size) for b in s.image_bytes) if s.image_bytes else 10**9
            for s in iter_samples(list_shards(str(run / "shards")))}


def test_filter_task_runs_a_filter_by_name_after_ingest(demo_run):
    from flytekit.types.directory import FlyteDirectory

    from tasks.filters import filter_samples
    from tasks.types import StepOut

    run = StepOut("ingest", FlyteDirectory(str(demo_run)))
    ingested = passing_ids(read_ledger(step_dir(demo_run, "ingest")))
    sides = short_sides(demo_run)
    cut = sorted(sides.values())[len(sides) // 3]  # a min side that drops about a third of the demo's images

    out = filter_samples(run=run, step="image_filter", prev=run, config_json=f'{{"min_side": {cut}}}')
    led = read_ledger(step_dir(out.dir.path, "image_filter")).set_index("sample_id")
    check_balance([str(demo_run), out.dir.path], ["ingest", "image_filter"])  # every ingested id decided exactly once
    assert set(led.index) == set(ingested)
    dropped = set(led.index[led["decision"] == "drop"])
    assert dropped == {i for i in ingested if sides[i] < cut} and dropped  # exactly the images below the cut
    assert set(led.loc[list(dropped), "reason"]) == {"image_too_small"}
    deck = (Path(out.dir.path) / "decks" / "image_filter.html").read_text()
    assert "image_too_small" in deck and f"min_side={cut}" in deck and f"{len(ingested)} samples in" in deck

    # the default preset (Qwen2-VL's hard limits) drops nothing of the demo: switching it on leaves the demo's
    # decisions as they are
    default = filter_samples(run=run, step="image_filter", prev=run)
    led = read_ledger(step_dir(default.dir.path, "image_filter"))
    assert set(led["decision"]) == {"keep"} and len(led) == len(ingested)


def test_filter_task_refuses_an_unknown_filter_or_config_key_before_any_work(demo_run):
    from flytekit.types.directory import FlyteDirectory

    from tasks.filters import filter_samples
    from tasks.types import StepOut

    run = StepOut("ingest", FlyteDirectory(str(demo_run)))
    with pytest.raises(Exception, match="no sample filter named 'image_filtr'; registered: .*image_filter"):
        filter_samples(run=run, step="image_filtr")
    with pytest.raises(Exception, match="did you mean 'min_side'"):
        filter_samples(run=run, step="image_filter", config_json='{"min_sid": 10}')
