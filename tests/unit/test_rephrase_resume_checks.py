"""Rephrase resume that checks: a shard in flight resumed with another model or chunk size is refused (naming the
fields) or recomputed on request; it never mixes two models' outputs nor loses samples from the ledger.

The two audit cases, reproduced: (1) crash with model A, resume with model B: before, B's chunks were appended
to A's finished ones; (2) crash with chunk_size 2, resume with chunk_size 4: before, chunk files were matched
by index only, so chunk 1 of size 2 (samples 2-3) stood for chunk 1 of size 4 (samples 4-7) and samples 4-7
never reached the ledger.
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_rephrase_run import RuleGenerator, cfg, make_samples

from core.foundation.ledger import read_ledger, step_dir
from core.steps.rephrase.resume import STAMP, RephraseResumeError, chunk_name, work_stamp
from core.steps.rephrase.step import rephrase_shards
from core.steps.rephrase.tokens import TokenCounter

SHARD = "shard-000000"


class OtherModel(RuleGenerator):
    """A second "model": also drops the word "red", so its rephrasings differ from RuleGenerator's."""

    def generate(self, requests, seeds):
        return [type(g)(g.text.replace("red ", ""), g.finish_reason, g.n_tokens)
                for g in super().generate(requests, seeds)]


@pytest.fixture(scope="module")
def counter():
    from test_rephrase_run import BERT_TOKENIZER

    return TokenCounter(BERT_TOKENIZER)


def run(out, config, gen, counter, samples):
    return rephrase_shards([(SHARD, lambda: iter(samples))], out, config, gen, counter)


def ledger(out):
    return read_ledger(step_dir(out, "rephrase")).sort_values("sample_id").reset_index(drop=True)


def crash_after_two_chunks(out, config, counter, samples):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(out, config, RuleGenerator(fail_on_call=3), counter, samples)
    work = out / "rephrase" / "work" / SHARD
    assert len(list(work.glob("chunk-*.json"))) == 2
    return work


def test_model_change_is_refused_naming_the_field(tmp_path, counter):
    samples = make_samples(10, SHARD)
    out = tmp_path / "run"
    crash_after_two_chunks(out, cfg(model="model-a"), counter, samples)
    with pytest.raises(RephraseResumeError, match=r"model: 'model-a' -> 'model-b'") as e:
        run(out, cfg(model="model-b"), OtherModel(), counter, samples)
    assert "on_config_change='recompute'" in str(e.value)
    assert not step_dir(out, "rephrase").is_dir() or not list(step_dir(out, "rephrase").glob("*.parquet"))


def test_model_change_with_recompute_gives_only_the_new_models_outputs(tmp_path, counter):
    samples = make_samples(10, SHARD)
    out = tmp_path / "run"
    crash_after_two_chunks(out, cfg(model="model-a"), counter, samples)
    gen = OtherModel()
    run(out, cfg(model="model-b", on_config_change="recompute"), gen, counter, samples)
    assert gen.calls == 3  # every chunk again: none of model A's is kept
    clean = tmp_path / "clean"
    run(clean, cfg(model="model-b"), OtherModel(), counter, samples)
    assert ledger(out).equals(ledger(clean))


def test_chunk_size_change_is_refused_or_recomputed_never_loses_samples(tmp_path, counter):
    samples = make_samples(10, SHARD)
    out = tmp_path / "run"
    crash_after_two_chunks(out, cfg(chunk_size=2), counter, samples)
    with pytest.raises(RephraseResumeError, match="chunk_size: 2 -> 4"):
        run(out, cfg(chunk_size=4), RuleGenerator(), counter, samples)
    run(out, cfg(chunk_size=4, on_config_change="recompute"), RuleGenerator(), counter, samples)
    df = ledger(out)
    assert sorted(df["sample_id"]) == sorted(s.id for s in samples)  # all 10, each once
    clean = tmp_path / "clean"
    run(clean, cfg(chunk_size=4), RuleGenerator(), counter, samples)
    assert df.equals(ledger(clean))


def test_chunks_are_named_by_their_ids_so_another_plan_is_never_read(tmp_path, counter):
    """Same stamp, other input order (e.g. a changed previous step): chunk files are matched by their ids."""
    samples = make_samples(10, SHARD)
    out = tmp_path / "run"
    work = crash_after_two_chunks(out, cfg(), counter, samples)
    reordered = samples[4:] + samples[:4]  # chunk 0 and 1 now hold other ids
    gen = RuleGenerator()
    res = run(out, cfg(), gen, counter, reordered).results[SHARD]
    assert res.chunks_resumed == 0 and gen.calls == 3
    assert sorted(ledger(out)["sample_id"]) == sorted(s.id for s in samples)
    assert not work.exists()  # published, then tidied


def test_chunks_without_a_stamp_are_not_trusted(tmp_path, counter):
    samples = make_samples(10, SHARD)
    out = tmp_path / "run"
    work = crash_after_two_chunks(out, cfg(), counter, samples)
    (work / STAMP).unlink()
    with pytest.raises(RephraseResumeError, match="without a stamp"):
        run(out, cfg(), RuleGenerator(), counter, samples)
    # a legacy index-named chunk file (written before chunks were named by ids) is not trusted either
    shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "chunk-000000.json").write_text("[]")
    with pytest.raises(RephraseResumeError, match="chunk-000000.json"):
        run(out, cfg(), RuleGenerator(), counter, samples)


def test_same_config_resumes_and_stamp_ignores_paths_of_identical_models(tmp_path, counter):
    samples = make_samples(10, SHARD)
    out = tmp_path / "run"
    crash_after_two_chunks(out, cfg(), counter, samples)
    gen = RuleGenerator()
    assert run(out, cfg(), gen, counter, samples).results[SHARD].chunks_resumed == 2 and gen.calls == 1
    # a model downloaded to another folder (a retried task) has the same stamp; another model does not
    a, b, c = tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"
    for d, hidden in ((a, 64), (b, 64), (c, 128)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"hidden_size": hidden}))
        (d / "model.safetensors").write_bytes(b"\0" * 2048)
    assert work_stamp(cfg(model=str(a))) == work_stamp(cfg(model=str(b)))
    assert work_stamp(cfg(model=str(a)))["model"] != work_stamp(cfg(model=str(c)))["model"]
    assert work_stamp(cfg(device="cpu", overlap_io=True)) == work_stamp(cfg(device="cuda"))


def test_chunk_name_depends_on_the_ids_and_position():
    assert chunk_name(0, ["a", "b"]) != chunk_name(0, ["a", "c"]) != chunk_name(1, ["a", "c"])
    assert chunk_name(3, ["a"]).startswith("chunk-000003-") and chunk_name(3, ["a"]) == chunk_name(3, ["a"])
