"""The Flyte tasks run locally end to end: reference LM -> scores -> range filter and slices."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppl_helpers import clean_records, garbled_records, samples  # noqa: E402

from core.foundation.configs import preset  # noqa: E402
from core.foundation.ledger import check_balance  # noqa: E402
from core.io.wds import write_shards  # noqa: E402
from core.steps.perplexity.config import PerplexityConfig  # noqa: E402
from core.steps.perplexity.slices import SliceConfig  # noqa: E402
from tasks.types import StepOut


def test_tasks_end_to_end(tmp_path):
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.file import FlyteFile

    from tasks.perplexity import score_perplexity, slice_by_perplexity, train_reference_lm

    recs = clean_records(30, seed=3) + garbled_records(4)
    ss = samples(recs)
    for s in ss:
        s.image_bytes = [b"\x89PNG fake, never decoded by this step"] * len(s.images)
    run = tmp_path / "run"
    write_shards(ss, str(run / "shards"), max_samples=20)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"clean": [r["id"] for r in recs if r["id"].startswith("c")]}))

    ingested = StepOut("ingest", FlyteDirectory(str(run)))
    model = train_reference_lm(run=ingested, reference_ids=FlyteFile(str(ref)), steps=30,
                               vocab_size=300)
    cfg = preset(PerplexityConfig, "tiny", device="cpu", batch_tokens=1024, max_length=256)
    scored = score_perplexity(run=ingested, model=model, config=cfg)
    assert scored.step == "perplexity"
    summary = json.loads((Path(scored.dir.path) / "perplexity" / "summary.json").read_text())
    assert summary["n_kept"] == len(recs) and summary["shards_scored"] == 2
    sliced = slice_by_perplexity(scores=scored, config=SliceConfig(mode="slices", n_slices=3))
    manifest = json.loads((Path(sliced.dir.path) / "ppl_filter" / "slices.json").read_text())
    assert [m["n"] for m in manifest] == [12, 11, 11]
    worst = json.loads(Path(manifest[-1]["ids"]).read_text())
    assert {f"g{i:04d}" for i in range(4)} <= set(worst)
    filtered = slice_by_perplexity(scores=scored, config=SliceConfig(mode="range", high_pct=90.0))
    check_balance([scored.dir.path, filtered.dir.path], ["perplexity", "ppl_filter"], inputs=[r["id"] for r in recs])


def test_workflow_runs_locally_after_ingest(tmp_path):
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.file import FlyteFile
    from PIL import Image

    from core.io.ingest import IngestConfig, ingest
    from workflows.perplexity import perplexity_slices

    recs = clean_records(24, seed=5) + garbled_records(3)
    (tmp_path / "img").mkdir()
    for r in recs:
        Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "img" / r["image"])
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    ingest(IngestConfig(source=str(tmp_path / "data.jsonl"), image_root=str(tmp_path / "img"),
                        run_dir=str(tmp_path / "run")))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"clean": [r["id"] for r in recs if r["id"].startswith("c")]}))
    out = perplexity_slices(run=FlyteDirectory(str(tmp_path / "run")), reference_ids=FlyteFile(str(ref)),
                            slice_config=SliceConfig(mode="slices", n_slices=3), lm_steps=30)
    manifest = json.loads((Path(out.dir.path) / "ppl_filter" / "slices.json").read_text())
    assert [m["n"] for m in manifest] == [9, 9, 9]
    assert {f"g{i:04d}" for i in range(3)} <= set(json.loads(Path(manifest[-1]["ids"]).read_text()))
