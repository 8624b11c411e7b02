"""Eval sets as shards (core.evals.eval_shards), embedded like training data, then decontamination and
mining against them: planted copies of eval items are dropped with `eval_contamination:<benchmark>`, and the
ablation variants `decontam` / `mined` select from that step's ledger and mining tables."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from core.demo.eval_fixtures import write_fixtures
from core.evals.base import LoadFailure
from core.evals.eval_shards import eval_embedding_sets, write_eval_shards
from core.evals.registry import get_benchmark
from core.foundation.ledger import LedgerWriter, check_balance, read_ledger, step_dir
from core.foundation.step import Passing
from core.io.wds import iter_samples, list_shards, write_shards
from core.runs.ablation import parse_variant, select_variant
from core.steps.dedup.config import tiny_decontam_config
from core.steps.dedup.mining import decontaminate
from core.steps.embed import embed_shards, tiny_embed_config
from tests.embed_data import encode, sample, scene

BENCHES = ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("eval_cache"))
    write_fixtures(root, defects=True)
    return root


@pytest.fixture(scope="module")
def eval_run(cache, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval_sets"))
    write_eval_shards(cache, BENCHES, out, shard_max_samples=3)
    return out


def test_eval_shards_every_row_accounted_for(cache, eval_run):
    led = read_ledger(step_dir(eval_run, "ingest"))
    for b in BENCHES:
        loaded = list(get_benchmark(b).load(f"{cache}/{b}"))
        rows = led[led.extra.str.contains(f'"benchmark": "{b}"')]
        assert len(rows) == len(loaded), b  # one ledger row per loader row, nothing dropped
        bad = {x.id: x.reason for x in loaded if isinstance(x, LoadFailure)}
        q = dict(zip(*(rows[rows.decision == "quarantine"][c] for c in ("sample_id", "reason"))))
        assert bad.items() <= q.items(), b  # the loader's failures keep the loader's reason
        # the rest were loaded but their image does not decode
        assert set(q.values()) - set(bad.values()) <= {"corrupt_image", "decompression_bomb"}, b
    # the fixtures plant a corrupt CountBench image (the loader reads bytes; decoding catches it) and a PixMo
    # image missing from the cache (the loader reports it)
    q = led[led.decision == "quarantine"]
    assert "corrupt_image" in set(q[q.sample_id.str.startswith("countbench")].reason)
    assert len(q[q.sample_id.str.startswith("pixmo")]) >= 1
    shards = list_shards(f"{eval_run}/shards")
    assert {s.rsplit("/", 1)[-1].rsplit("-", 1)[0] for s in shards} == set(BENCHES)
    got = list(iter_samples(shards))
    kept = led[led.decision == "keep"]
    assert sorted(s.id for s in got) == sorted(kept.sample_id)
    for s in got:
        assert s.source in BENCHES and len(s.images) == len(s.image_bytes) >= 1
        assert s.conversations[0].value.count("<image>") == len(s.images)
    assert check_balance([eval_run], ["ingest"])[0].inputs == len(led)


def test_eval_shards_rejects_unsafe_benchmark_name(cache, tmp_path):
    with pytest.raises(ValueError, match="shard prefix"):
        write_eval_shards(cache, ["doc-vqa"], str(tmp_path))


def test_eval_embedding_sets_groups_by_benchmark_and_rejects_foreign_files(tmp_path):
    d = tmp_path / "embed"
    d.mkdir()
    for name in ["docvqa-000000", "docvqa-000001", "pixmo_points-000000"]:
        (d / f"{name}.parquet").write_bytes(b"")
    sets = eval_embedding_sets(str(tmp_path))
    assert sets == {"docvqa": [str(d / "docvqa-000000.parquet"), str(d / "docvqa-000001.parquet")],
                    "pixmo_points": [str(d / "pixmo_points-000000.parquet")]}
    (d / "shard-000000.tar.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="not an eval-set embedding file"):
        eval_embedding_sets(str(tmp_path))


def _reencode(png: bytes, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_planted_eval_copies_dropped_and_mined(cache, eval_run, tmp_path):
    """Training data = unrelated scenes + an exact copy and a re-encoded copy of eval items."""
    evals = {s.id: s for s in iter_samples(list_shards(f"{eval_run}/shards"))}
    exact = evals["docvqa-00000" if "docvqa-00000" in evals else sorted(i for i in evals if i.startswith("docvqa"))[0]]
    chart = evals[sorted(i for i in evals if i.startswith("chartqa"))[0]]
    train = [sample(f"t{i:03d}", [encode(scene(100 + i, 96))]) for i in range(24)]
    train.append(sample("copy_docvqa", [exact.image_bytes[0]], question="What is written here?"))
    train.append(sample("reenc_chartqa", [_reencode(chart.image_bytes[0], 85)], question="Read the chart."))
    run = tmp_path / "train"
    shards = write_shards(train, str(run / "shards"), max_samples=10)
    with LedgerWriter(step_dir(run, "ingest") / "part-0.parquet", "ingest") as led:
        for s in train:
            led.add(s.id, "keep", shard=next(sh.name for sh in shards if s.id in sh.ids))

    cfg = tiny_embed_config(cache_dir=str(tmp_path / "models"), batch_size=8)
    embed_shards([sh.path for sh in shards], str(run / "embed"), cfg, use_ray=False)
    ev_out = tmp_path / "eval_emb"
    embed_shards(list_shards(f"{eval_run}/shards"), str(ev_out / "embed"), cfg, use_ray=False)
    sets = eval_embedding_sets(str(ev_out))
    assert set(sets) == set(BENCHES)

    dc = tmp_path / "decontam"
    # the tiny ViT is trained (contrastive, demo-generator pairs): its threshold is on SigLIP2's scale
    cfg_dc = tiny_decontam_config(k=2, device="cpu")
    assert cfg_dc.threshold == 0.98
    counts = decontaminate(str(run), str(dc), sets, cfg_dc, Passing.read(run, "embed"))
    led = read_ledger(step_dir(dc, "decontam")).set_index("sample_id")
    assert led.loc["copy_docvqa", "reason"] == "eval_contamination:docvqa"
    assert led.loc["reenc_chartqa", "reason"] == "eval_contamination:chartqa"
    assert led.loc["copy_docvqa", "score"] == pytest.approx(1.0, abs=1e-3)
    others = led.drop(index=["copy_docvqa", "reenc_chartqa"])
    assert (others.decision == "keep").all(), others[others.decision != "keep"]
    assert counts["n_dropped"] == 2 and counts["n_input"] == len(train)
    assert check_balance([run, dc], ["ingest", "embed", "decontam"])[-1].dropped == 2

    mined = pd.read_parquet(dc / "mining" / "docvqa.parquet")
    top = mined[(mined.eval_id == exact.id) & (mined["rank"] == 0)]
    assert top.sample_id.tolist() == ["copy_docvqa"]

    dirs = [str(run), str(dc)]
    decon = select_variant(parse_variant("decontam"), dirs)
    assert "copy_docvqa" not in decon and "reenc_chartqa" not in decon and len(decon) == len(train) - 2
    mined_ids = select_variant(parse_variant("mined"), dirs)
    all_mined = set(pd.concat(pd.read_parquet(f) for f in (dc / "mining").glob("*.parquet")).sample_id)
    assert set(mined_ids) == all_mined - {"copy_docvqa", "reenc_chartqa"}
    assert 0 < len(mined_ids) < len(train)

    # the deck's gallery: each dropped sample next to its nearest eval item, with both images
    from core.steps.dedup.report import decontam_report_html, shard_fetcher

    led_all = read_ledger(step_dir(dc, "decontam"))
    eled = read_ledger(step_dir(eval_run, "ingest"))
    html = decontam_report_html(str(dc), counts, cfg_dc,
                                shard_fetcher(str(run / "shards"), dict(zip(led_all.sample_id, led_all.shard))),
                                shard_fetcher(f"{eval_run}/shards", dict(zip(eled.sample_id, eled.shard))))
    gallery = html[html.index("dropped: most similar"):html.index("kept: most similar")]
    assert "copy_docvqa" in gallery and exact.id in gallery and "reenc_chartqa" in gallery
    assert gallery.count("data:image/") >= 4 and "not found in shards" not in gallery
