"""Retries resume (tasks/paths.py `step_workdir`): every per-shard step task, killed after shard 2 of 4 and run
again with the same inputs (as a Flyte retry does), processes only shards 3-4 and ends with the ledger of an
uninterrupted run. Also: a changed config recomputes in its own folder, a folder stamped with another config
refuses, and a remote (S3) root resumes from what each finished unit pushed.

The kill is a preemption of the core step between units: its per-unit hook (`process`, or `publish` for embed's
Ray driver) raises before the 3rd unit, so units 1-2 are published and nothing of unit 3 is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from flytekit.types.directory import FlyteDirectory

from core.foundation.ledger import LedgerWriter, read_ledger, step_dir
from core.foundation.sample import Sample
from core.io.wds import list_shards, write_shards
from core.steps.export import ExportConfig
from tasks.types import StepOut
from tests.ppl_helpers import clean_records

SHARDS = [f"shard-{i:06d}" for i in range(4)]


class Preempted(RuntimeError):
    """What the patched step raises: the pod went away between units."""


def preempt(monkeypatch, cls, method: str = "process", after: int | None = None) -> list[str]:
    """Wrap `cls.method(self, unit_or_result, ...)`: record each unit's name; with `after`, raise `Preempted`
    instead of starting unit `after + 1`. Returns the list of recorded unit names."""
    calls: list[str] = []
    stash = f"_unpatched_{method}"
    orig = cls.__dict__.get(stash) or getattr(cls, method)  # a second patch replaces the first
    monkeypatch.setattr(cls, stash, orig, raising=False)

    def wrapped(self, unit, *a, **kw):
        name = getattr(unit, "name", None) or getattr(unit, "shard", None)
        if after is not None and len(calls) >= after:
            raise Preempted(f"preempted before {name}")
        calls.append(name)
        return orig(self, unit, *a, **kw)

    monkeypatch.setattr(cls, method, wrapped)
    return calls


def text_samples(n: int, seed: int) -> list[Sample]:
    """Text-only conversations (the perplexity helpers' records without their images)."""
    out = []
    for r in clean_records(n, seed=seed):
        r = dict(r, conversations=[dict(t, value=t["value"].replace("<image>\n", "")) for t in r["conversations"]])
        r.pop("image", None)
        out.append(Sample.from_record(r))
    return out


@pytest.fixture(autouse=True)
def _no_task_cache(monkeypatch):
    """Every task call runs its body: flytekit's local cache (the tasks are `cache=True`) would answer a repeated
    call from its first result, and a Flyte retry never hits the cache (the failed attempt stored nothing)."""
    from flytekit.core.local_cache import LocalTaskCache

    monkeypatch.setattr(LocalTaskCache, "get", staticmethod(lambda *a, **kw: None))


def ledger(d: str | os.PathLike, step: str) -> pd.DataFrame:
    """A step's ledger in a comparable form (sorted, NaN as a string)."""
    df = read_ledger(step_dir(d, step)).sort_values(["sample_id"]).reset_index(drop=True).astype(object)
    return df.where(df.notna(), "<null>")


def kill_then_retry(monkeypatch, tmp_path, cls, call, step: str, method: str = "process", parts=SHARDS):
    """The scenario every step shares: a killed run, its retry, and an uninterrupted run in another resume root;
    returns (the retry's output dir, what the retry processed)."""
    monkeypatch.setenv("MMCURATE_RESUME_ROOT", str(tmp_path / "root"))
    preempt(monkeypatch, cls, method, after=2)
    with pytest.raises(Exception, match="preempted"):
        call()
    left = sorted(p.stem for p in (tmp_path / "root").glob(f"{step}/*/ledger/{step}/part-*.parquet"))
    retried = preempt(monkeypatch, cls, method)  # the retry: same inputs, no preemption
    out = call()
    assert sorted(retried) == sorted(parts[2:])  # only the unfinished units were processed
    assert left == [f"part-{n}" for n in parts[:2]]  # the killed attempt left exactly the finished units
    monkeypatch.setenv("MMCURATE_RESUME_ROOT", str(tmp_path / "clean_root"))
    clean = call()
    pd.testing.assert_frame_equal(ledger(_path(out), step), ledger(_path(clean), step))
    return out, retried


def _path(out) -> str:
    return out.path if isinstance(out, FlyteDirectory) else out


# ---- perplexity -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppl_world(tmp_path_factory):
    """A run of 4 shards (5 samples each) and the tiny reference LM trained on it."""
    from core.steps.perplexity.reference import train_reference_lm

    tmp = tmp_path_factory.mktemp("ppl")
    write_shards(text_samples(20, seed=5), str(tmp / "run" / "shards"), max_samples=5)
    model = train_reference_lm(list_shards(str(tmp / "run" / "shards")), tmp / "lm", steps=10, vocab_size=300)
    return tmp / "run", model


def _score(run, model, **cfg):
    from core.foundation.configs import preset
    from core.steps.perplexity.config import PerplexityConfig
    from tasks.perplexity import score_perplexity

    config = preset(PerplexityConfig, "tiny", **{"device": "cpu", "batch_tokens": 512, "max_length": 128, **cfg})
    return score_perplexity(run=StepOut("ingest", FlyteDirectory(str(run))), model=FlyteDirectory(str(model)),
                            config=config).dir


def test_perplexity_retry_scores_only_the_unfinished_shards(ppl_world, tmp_path, monkeypatch):
    from core.steps.perplexity.pipeline import PerplexityStep

    run, model = ppl_world
    out, _ = kill_then_retry(monkeypatch, tmp_path, PerplexityStep, lambda: _score(run, model), "perplexity")
    summary = json.loads((Path(out.path) / "perplexity" / "summary.json").read_text())
    assert summary["shards_scored"] == 2 and summary["shards_skipped"] == 2 and summary["n_samples"] == 20


def test_perplexity_changed_config_recomputes_and_foreign_stamp_refuses(ppl_world, tmp_path, monkeypatch):
    from core.steps.perplexity.pipeline import PerplexityStep

    run, model = ppl_world
    first = _score(run, model)
    calls = preempt(monkeypatch, PerplexityStep)
    again = _score(run, model)
    assert again.path == first.path and calls == []  # the same call: every shard already done
    other = _score(run, model, max_length=96)
    assert other.path != first.path and sorted(calls) == SHARDS  # another config: its own folder, recomputed
    # a folder whose stamp says another config (e.g. code changed under the same key): refused, nothing redone
    stamp = Path(first.path) / "ledger" / "perplexity" / "_step.json"
    doc = json.loads(stamp.read_text())
    assert len(doc["code_version"]) == 16  # the code is stamped too (core/foundation/stamp.py code_version)
    doc["config"]["max_length"] = 4096
    stamp.write_text(json.dumps(doc))
    calls.clear()
    with pytest.raises(Exception, match="max_length: 4096 -> 128"):
        _score(run, model)
    assert calls == []


def test_perplexity_resumes_from_a_remote_root(ppl_world, tmp_path, monkeypatch, moto_s3):
    """S3 root: the task works in a fresh local mirror per attempt; each finished shard was pushed at once."""
    import fsspec

    from core.steps.perplexity.pipeline import PerplexityStep
    from tasks.paths import source

    run, model = ppl_world
    root = f"s3://{moto_s3.bucket}/mmcurate/steps"
    monkeypatch.setenv("MMCURATE_RESUME_ROOT", root)
    preempt(monkeypatch, PerplexityStep, after=2)
    with pytest.raises(Exception, match="preempted"):
        _score(run, model)
    fs = fsspec.filesystem("s3")
    [key] = fs.ls(f"{moto_s3.bucket}/mmcurate/steps/perplexity")
    parts = sorted(Path(p).name for p in fs.glob(f"{key}/ledger/perplexity/part-*.parquet"))
    assert parts == ["part-shard-000000.parquet", "part-shard-000001.parquet"]  # pushed per unit, not at the end
    assert len(fs.glob(f"{key}/perplexity/scores-*.parquet")) == 2 and fs.exists(f"{key}/ledger/perplexity/_step.json")
    retried = preempt(monkeypatch, PerplexityStep)
    out = _score(run, model)
    assert sorted(retried) == SHARDS[2:]
    assert source(out) == f"{root}/perplexity/{Path(key).name}"  # the task returns the remote folder itself
    local = tmp_path / "fetched"
    fs.get(f"{key}/", str(local) + "/", recursive=True)
    monkeypatch.setenv("MMCURATE_RESUME_ROOT", str(tmp_path / "clean_root"))
    clean = _score(run, model)
    pd.testing.assert_frame_equal(ledger(local, "perplexity"), ledger(clean.path, "perplexity"))
    summary = json.loads((local / "perplexity" / "summary.json").read_text())
    assert summary["shards_skipped"] == 2 and summary["n_samples"] == 20


# ---- decontamination ------------------------------------------------------------------------------
@pytest.fixture()
def decontam_world(tmp_path):
    """4 training embeddings files (an embed output) and one eval set that copies two training vectors."""
    from core.demo.embeddings import clustered_embeddings, write_embedding_parquet

    x = clustered_embeddings(40, 8, 4, seed=2, spread=0.8)
    ids = [f"t{i:03d}" for i in range(40)]
    emb = tmp_path / "emb"
    emb.mkdir()
    for k, name in enumerate(SHARDS):
        rows = list(range(10 * k, 10 * k + 10))
        write_embedding_parquet(str(emb / f"{name}.parquet"), [ids[r] for r in rows], x[rows], x[rows])
    ev = tmp_path / "ev"
    (ev / "embed").mkdir(parents=True)
    write_embedding_parquet(str(ev / "embed" / "countbench-000000.parquet"), ["q0", "q1"], x[[5, 27]], x[[5, 27]])
    return emb, ev


def test_decontaminate_retry_decides_only_the_unfinished_files(decontam_world, tmp_path, monkeypatch):
    from core.steps.dedup.config import DecontamConfig
    from core.steps.dedup.mining import DecontamStep
    from tasks.dedup import decontam

    emb, ev = decontam_world

    def call():
        return decontam(embeddings=StepOut("embed", FlyteDirectory(str(emb))),
                        evals=StepOut("embed", FlyteDirectory(str(ev))), config=DecontamConfig(threshold=0.999, k=3)).dir

    out, _ = kill_then_retry(monkeypatch, tmp_path, DecontamStep, call, "decontam")
    led = ledger(out.path, "decontam")
    assert set(led.loc[led.decision == "drop", "sample_id"]) == {"t005", "t027"} and len(led) == 40
    mined = pd.read_parquet(Path(out.path) / "mining" / "countbench.parquet")
    assert len(mined) == 2 * 3  # mining saw every file, the skipped ones included


# ---- rephrase -------------------------------------------------------------------------------------
def test_rephrase_retry_rephrases_only_the_unfinished_shards(tmp_path, monkeypatch):
    from core.foundation.configs import preset
    from core.steps.rephrase.config import RephraseConfig
    from core.steps.rephrase.step import RephraseStep
    from core.steps.rephrase.tiny_model import random_chat_lm
    from tasks.rephrase import rephrase_samples

    recs = [{"id": f"s{i}", "conversations": [
        {"from": "human", "value": f"What is written on sign {i}?"},
        {"from": "gpt", "value": f"Sign {i} says the shop opens at 9 and closes at 17."}]} for i in range(8)]
    write_shards([Sample.from_record(r) for r in recs], str(tmp_path / "run" / "shards"), max_samples=2)
    model = random_chat_lm([r["conversations"][1]["value"] for r in recs] * 3, tmp_path / "model")

    def call():
        return rephrase_samples(run=StepOut("ingest", FlyteDirectory(str(tmp_path / "run"))),
                                model_dir=FlyteDirectory(str(model)),
                                config=preset(RephraseConfig, "tiny", max_new_tokens=4, chunk_size=2)).out.dir

    out, _ = kill_then_retry(monkeypatch, tmp_path, RephraseStep, call, "rephrase")
    assert json.loads((Path(out.path) / "rephrase" / "report.json").read_text())["n_samples"] == 8


# ---- targeted generation: one shard per task, so a re-run of the fan-out skips the finished tasks ---
def test_targeted_generation_rerun_generates_only_the_unfinished_shards(tmp_path, monkeypatch):
    from core.targeted import vlm as vlm_mod
    from core.targeted.generate import STEP, TargetedGenerateStep
    from core.targeted.retrieve import RETRIEVED_COLUMNS, generated_id
    from tasks.targeted import generate_targeted_shard
    from tasks.types import StepOut
    from tests.targeted_doubles import ScriptedVLM, pool_samples

    write_shards(pool_samples(8), str(tmp_path / "pool" / "shards"), max_samples=8)
    rows = [{"gen_id": generated_id(f"p{i:03d}"), "pool_id": f"p{i:03d}", "pool_shard": "shard-000000",
             "subgroup": "count_like", "family": "counting", "similarity": 0.9, "ref_id": "r0", "rank": i,
             "gen_shard": f"gen-{i // 2:06d}"} for i in range(8)]
    (tmp_path / "ret" / "targeted").mkdir(parents=True)
    pd.DataFrame(rows, columns=RETRIEVED_COLUMNS).to_parquet(tmp_path / "ret" / "targeted" / "retrieved.parquet")
    (tmp_path / "sub" / "targeted").mkdir(parents=True)
    pd.DataFrame([{"ref_id": "r0", "subgroup": "count_like", "question": "How many stars?", "answer": "3",
                   "used": True}]).to_parquet(tmp_path / "sub" / "targeted" / "subgroups.parquet")
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(vlm_mod, "make_vlm", lambda cfg: ScriptedVLM(lambda r: "Question: How many stars?\nAnswer: 3"))
    gens = [f"gen-{k:06d}" for k in range(4)]

    def fan_out():
        return [generate_targeted_shard(shard=g, retrieved=FlyteDirectory(str(tmp_path / "ret")),
                                        subgroups=FlyteDirectory(str(tmp_path / "sub")),
                                        pool=StepOut("ingest", FlyteDirectory(str(tmp_path / "pool"))),
                                        model=FlyteDirectory(str(tmp_path / "model"))) for g in gens]

    monkeypatch.setenv("MMCURATE_RESUME_ROOT", str(tmp_path / "root"))
    preempt(monkeypatch, TargetedGenerateStep, after=2)
    with pytest.raises(Exception, match="preempted"):
        fan_out()
    retried = preempt(monkeypatch, TargetedGenerateStep)
    outs = fan_out()
    assert retried == gens[2:]
    monkeypatch.setenv("MMCURATE_RESUME_ROOT", str(tmp_path / "clean_root"))
    clean = fan_out()
    for a, b in zip(outs, clean):
        pd.testing.assert_frame_equal(ledger(a.path, STEP), ledger(b.path, STEP))
    assert sum(len(ledger(o.path, STEP)) for o in outs) == 8


# ---- export: one unit (output shards span input shards); a retry after it finished reuses it --------
def test_image_filter_retry_decides_only_the_unfinished_shards(ppl_world, tmp_path, monkeypatch):
    from core.steps.filters.image_filter import ImageFilter
    from tasks.filters import filter_samples

    run, _ = ppl_world  # 4 shards of text samples: every one kept, as a filter keeps text-only samples

    def call():
        return filter_samples(run=StepOut("ingest", FlyteDirectory(str(run))), step="image_filter").dir

    out, _ = kill_then_retry(monkeypatch, tmp_path, ImageFilter, call, "image_filter")
    assert set(ledger(out.path, "image_filter")["decision"]) == {"keep"}


def test_export_retry_after_the_export_finished_reuses_it(tmp_path, monkeypatch):
    import core.steps.export as core_export
    from core.steps.export import ExportStep
    from tasks.export import export_dataset

    infos = write_shards(text_samples(12, seed=4), str(tmp_path / "run" / "shards"), max_samples=3)  # 4 input shards
    with LedgerWriter(step_dir(tmp_path / "run", "ingest") / "part-ingest.parquet", "ingest") as led:
        for info in infos:
            for sid in info.ids:
                led.add(sid, "keep", shard=info.name)
    monkeypatch.setenv("MMCURATE_RESUME_ROOT", str(tmp_path / "root"))
    processed = preempt(monkeypatch, ExportStep)

    def deck_dies(*a, **kw):  # the pod dies after the export was published, while rendering its deck
        raise Preempted("preempted while rendering the deck")

    real_html = core_export.export_report_html
    monkeypatch.setattr(core_export, "export_report_html", deck_dies)
    with pytest.raises(Exception, match="preempted"):
        export_dataset(run=StepOut("ingest", FlyteDirectory(str(tmp_path / "run"))), config=ExportConfig(max_samples=5))
    assert processed == ["export"]
    monkeypatch.setattr(core_export, "export_report_html", real_html)
    out = export_dataset(run=StepOut("ingest", FlyteDirectory(str(tmp_path / "run"))), config=ExportConfig(max_samples=5)).dir
    assert processed == ["export"]  # reused, not written again
    manifest = json.loads((Path(out.path) / "manifest.json").read_text())
    assert manifest["n_samples"] == 12
    monkeypatch.setenv("MMCURATE_RESUME_ROOT", str(tmp_path / "clean_root"))
    clean = export_dataset(run=StepOut("ingest", FlyteDirectory(str(tmp_path / "run"))), config=ExportConfig(max_samples=5)).dir
    assert processed == ["export", "export"]
    assert (Path(clean.path) / "manifest.json").read_bytes() == (Path(out.path) / "manifest.json").read_bytes()
    pd.testing.assert_frame_equal(ledger(out.path, "export"), ledger(clean.path, "export"))
    # another config: its own folder, exported again
    other = export_dataset(run=StepOut("ingest", FlyteDirectory(str(tmp_path / "run"))), config=ExportConfig(max_samples=4)).dir
    assert other.path != clean.path and processed == ["export"] * 3


# ---- embed (Ray actors; the driver publishes each shard) --------------------------------------------
@pytest.mark.slow
def test_embed_retry_embeds_only_the_unfinished_shards(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from core.foundation.configs import override
    from core.steps.embed import tiny_embed_config
    from core.steps.embed.pipeline import EmbedStep
    from tasks.embed import embed_shards
    from tests.embed_data import mixed_samples, write_test_shards

    write_test_shards(str(tmp_path / "shards"), mixed_samples(8, seed=3, size=64), per_shard=2)  # 4 shards
    cfg = override(tiny_embed_config(cache_dir=str(tmp_path / "cache"), batch_size=4), num_actors=1)
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # kept across the three runs
    try:
        out, _ = kill_then_retry(monkeypatch, tmp_path, EmbedStep,
                                 lambda: embed_shards(shards=FlyteDirectory(str(tmp_path / "shards")), config=cfg).dir,
                                 "embed", method="publish")
    finally:
        ray.shutdown()
    assert sorted(p.name for p in (Path(out.path) / "embed").glob("*.parquet")) == [f"{s}.parquet" for s in SHARDS]


# ---- the mirror of a URL root ---------------------------------------------------------------------
def test_mirror_pulls_pushes_changes_and_removes_what_the_step_cleared(tmp_path, monkeypatch, moto_s3):
    import fsspec

    from tasks.paths import step_workdir

    monkeypatch.setenv("MMCURATE_RESUME_ROOT", f"s3://{moto_s3.bucket}/steps")
    fs = fsspec.filesystem("s3")
    sf = step_workdir("toy", "k1")
    part = Path(sf.path) / "ledger" / "toy" / "part-a.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"a")
    (Path(sf.path) / "ledger" / "toy" / ".writer.lock").write_text("pid")  # never travels
    (Path(sf.path) / "scores.parquet").write_bytes(b"s")
    assert sf.push() == 2 and sf.push() == 0  # unchanged files are not sent again
    assert sorted(fs.find(f"{moto_s3.bucket}/steps/toy/k1")) == [
        f"{moto_s3.bucket}/steps/toy/k1/ledger/toy/part-a.parquet", f"{moto_s3.bucket}/steps/toy/k1/scores.parquet"]
    sf.close()
    again = step_workdir("toy", "k1")  # the next attempt: a fresh mirror, filled from the remote folder
    assert again.path != sf.path
    assert (Path(again.path) / "ledger" / "toy" / "part-a.parquet").read_bytes() == b"a"
    (Path(again.path) / "ledger" / "toy" / "part-a.parquet").unlink()  # a recompute cleared it
    (Path(again.path) / "scores.parquet").write_bytes(b"t")
    assert again.close().endswith("/steps/toy/k1")
    assert fs.find(f"{moto_s3.bucket}/steps/toy/k1") == [f"{moto_s3.bucket}/steps/toy/k1/scores.parquet"]
    assert fs.cat(f"{moto_s3.bucket}/steps/toy/k1/scores.parquet") == b"t"
