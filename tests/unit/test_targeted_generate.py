"""Generation by shard: request building (vLLM and HF), prompts with in-context examples, determinism,
resume after a kill with identical output, ledger contents, and the filters on scripted outputs."""

import base64
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from core.foundation.ledger import check_balance, read_ledger, step_dir
from core.io.wds import iter_samples, list_shards, write_shards
from core.targeted.config import tiny_targeted_config
from core.targeted.generate import STEP, build_user_prompt, generate_shards, plan_requests
from core.targeted.retrieve import RETRIEVED_COLUMNS, generated_id
from core.targeted.tiny_vlm import build_tiny_llava
from core.targeted.vlm import VLLMVLM, TransformersVLM, VLMRequest, image_mime, vllm_messages, vllm_sampling_kwargs
from tests.targeted_doubles import DiesAfter, Killed, ScriptedVLM, png, pool_samples

EXAMPLES = {
    "count_like": [{"ref_id": f"r{i}", "question": f"How many stars are in row {i}?", "answer": str(i)} for i in range(5)],
    "chartqa_like": [{"ref_id": "c1", "question": "What is the value for 2015?", "answer": "55"}],
}


def test_vllm_request_building():
    img = png(0)
    req = VLMRequest(img, "sys", "Write a question.", seed=7)
    msgs = vllm_messages(req)
    assert msgs[0] == {"role": "system", "content": "sys"}
    part_img, part_txt = msgs[1]["content"]
    assert msgs[1]["role"] == "user" and part_txt == {"type": "text", "text": "Write a question."}
    url = part_img["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == img
    assert image_mime(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert image_mime(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert vllm_messages(VLMRequest(img, "", "u", 1))[0]["role"] == "user"  # no empty system turn
    assert vllm_sampling_kwargs(5, 64, 0.0, 0.9) == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 5}
    assert vllm_sampling_kwargs(5, 64, 0.7, 0.9)["top_p"] == 0.9


def test_vllm_backend_needs_vllm():
    pytest.importorskip("flytekit")  # any installed module; vllm itself must be absent on CPU
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="vllm image"):
            VLLMVLM("/nonexistent", max_new_tokens=8)
    else:
        pytest.skip("vllm is installed here: the CPU-only error path does not apply")


def test_prompt_has_k_examples_of_the_subgroup_and_is_stable():
    cfg = tiny_targeted_config("m", k_shot=2)
    rows = _retrieved(["a", "b"], "count_like")
    imgs = {"a": png(1), "b": png(2)}
    plans = plan_requests(rows, imgs, EXAMPLES, cfg)
    assert [p[0].gen_id for p in plans] == [generated_id("a"), generated_id("b")]
    for _, req, ex, sha in plans:
        assert len(ex) == 2 and all(e in EXAMPLES["count_like"] for e in ex)
        assert all(f"Question: {e['question']}\nAnswer: {e['answer']}" in req.user for e in ex)
        assert req.user.startswith(cfg.prompts["counting"].instruction)
        assert sha == hashlib.sha256(json.dumps([req.system, req.user]).encode()).hexdigest()
    again = plan_requests(rows.iloc[::-1], imgs, EXAMPLES, cfg)  # order/batching does not change a request
    assert {p[1] for p in plans} == {p[1] for p in again}
    assert build_user_prompt(cfg.prompts["chart"], []).count("Question:") == 1  # the format line only


def _retrieved(pool_ids, subgroup, shard_size=100, pool_shard="shard-000000"):
    fam = {"count_like": "counting", "chartqa_like": "chart"}[subgroup]
    rows = [{"gen_id": generated_id(p), "pool_id": p, "pool_shard": pool_shard, "subgroup": subgroup, "family": fam,
             "similarity": 0.9, "ref_id": "r0", "rank": i, "gen_shard": f"gen-{i // shard_size:06d}"}
            for i, p in enumerate(pool_ids)]
    return pd.DataFrame(rows, columns=RETRIEVED_COLUMNS)


@pytest.fixture()
def pool(tmp_path):
    write_shards(pool_samples(10), str(tmp_path / "pool" / "shards"), max_samples=5)
    return {Path(u).stem: u for u in list_shards(str(tmp_path / "pool" / "shards"))}


def _rows_for(pool, ids, subgroup, shard_size):
    df = _retrieved(ids, subgroup, shard_size)
    df["pool_shard"] = ["shard-000000" if int(p[1:]) < 5 else "shard-000001" for p in ids]
    return df


def _nulls_equal(df: pd.DataFrame) -> pd.DataFrame:
    df = df.astype(object)
    return df.where(df.notna(), "<null>")  # NaN != NaN would make equal tables compare unequal


def _snapshot(d: Path) -> dict:
    out = {}
    for f in sorted(d.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(d))
            out[rel] = _nulls_equal(pd.read_parquet(f)).to_dict("list") if f.suffix == ".parquet" else f.read_bytes()
    return out


def test_resume_after_kill_is_identical_with_the_real_tiny_vlm(tmp_path, pool):
    """The transformers backend with the project's tiny random LLaVA; a kill after shard 1, then a re-run."""
    model = build_tiny_llava(tmp_path / "vlm", ["Question: How many stars? Answer: 3"] * 10)
    cfg = tiny_targeted_config(model, max_new_tokens=12, batch_size=2, shard_size=3)
    rows = _rows_for(pool, [f"p{i:03d}" for i in range(8)], "count_like", 3)
    vlm = TransformersVLM(model, max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=2, device="cpu")
    full = generate_shards(rows, pool, tmp_path / "full", cfg, EXAMPLES, generator=vlm)
    assert [s.n for s in full] == [3, 3, 2] and not any(s.skipped for s in full)
    with pytest.raises(Killed):
        generate_shards(rows, pool, tmp_path / "resumed", cfg, EXAMPLES, generator=DiesAfter(vlm, 1))
    assert len(list(step_dir(tmp_path / "resumed", STEP).glob("*.parquet"))) == 1  # only the finished shard
    again = generate_shards(rows, pool, tmp_path / "resumed", cfg, EXAMPLES, generator=vlm)
    assert [s.skipped for s in again] == [True, False, False]
    assert _snapshot(tmp_path / "full") == _snapshot(tmp_path / "resumed")
    led = read_ledger(step_dir(tmp_path / "full", STEP))
    assert sorted(led["sample_id"]) == sorted(rows["gen_id"])
    # a random model writes noise: every output is rejected with a reason, none silently lost
    assert set(led["decision"]) <= {"drop", "keep"}
    assert led.loc[led.decision == "drop", "reason"].str.startswith("gen_rejected:").all()


def test_scripted_outputs_ledger_shards_and_missing_images(tmp_path, pool):
    replies = {}

    def script(req):  # the prompt's examples decide nothing here; the reply depends on the image
        return replies[req.image]

    ids = [f"p{i:03d}" for i in range(4)] + ["p_absent"]
    rows = _rows_for(pool, ids[:4], "count_like", 100)
    rows = pd.concat([rows, _retrieved(["p_absent"], "count_like")], ignore_index=True)
    replies[png(0)] = "Question: How many red stars can you see?\nAnswer: 4"
    replies[png(1)] = "Question: How many red stars can you see?\nAnswer: four"
    replies[png(2)] = "There are four red stars in this picture."
    replies[png(3)] = "Question: How many blue circles are there?\nAnswer: 2"
    cfg = tiny_targeted_config("m")
    vlm = ScriptedVLM(script)
    generate_shards(rows, pool, tmp_path / "g", cfg, EXAMPLES, generator=vlm)
    led = read_ledger(step_dir(tmp_path / "g", STEP)).set_index("sample_id")
    assert led.loc[generated_id("p000"), "decision"] == "keep"
    assert led.loc[generated_id("p001"), "reason"] == "gen_rejected:answer_format:not_a_number"
    assert led.loc[generated_id("p002"), "reason"] == "gen_rejected:no_question"
    assert led.loc[generated_id("p_absent"), "reason"] == "missing_pool_image"
    extra = json.loads(led.loc[generated_id("p000"), "extra"])
    assert extra["subgroup"] == "count_like" and extra["pool_id"] == "p000" and extra["generator"] == "scripted"
    assert len(extra["prompt_sha256"]) == 64
    check_balance(tmp_path / "g", [STEP])
    got = {s.id: s for s in iter_samples(list_shards(str(tmp_path / "g" / "shards")))}
    assert set(got) == {generated_id("p000"), generated_id("p003")}
    s = got[generated_id("p000")]
    assert s.image_bytes == [png(0)] and s.images == [f"{generated_id('p000')}.png"]
    assert s.conversations[0].value == "<image>\nHow many red stars can you see?\nAnswer with a single number."
    assert s.metadata["targeted"]["pool_id"] == "p000"
    # a re-run is a no-op (every shard is published) and needs no model
    assert all(st.skipped for st in generate_shards(rows, pool, tmp_path / "g", cfg, EXAMPLES, generator=None))


def test_filters_reject_by_reason_and_export(tmp_path, pool, tmp_path_factory):
    from core.targeted.filters import filter_generated
    from core.targeted.pipeline import export_generated
    from tests.ppl_helpers import tiny_lm

    replies = {png(0): "Question: How many stars are in row 1?\nAnswer: 1",  # a reference item's Q/A
               png(1): "Question: How many red triangles are in the picture?\nAnswer: 3",
               png(2): "Question: How many red triangles are in the picture?\nAnswer: 3",  # same as p001
               png(3): "Question: How many green squares are shown?\nAnswer: 6",
               png(4): "Question: How many blue balloons are shown in total?\nAnswer: 5"}
    rows = _rows_for(pool, [f"p{i:03d}" for i in range(5)], "count_like", 100)
    cfg = tiny_targeted_config("m", ppl_direction="none", decontam_threshold=0.95, k_shot=0)
    generate_shards(rows, pool, tmp_path / "g", cfg, EXAMPLES, generator=ScriptedVLM(lambda r: replies[r.image]))
    ref_texts = {e["ref_id"]: f"{e['question']}\n{e['answer']}" for e in EXAMPLES["count_like"]}
    evq = {"countbench": {"cb1": "How many green squares are shown?"}}
    counts = filter_generated(tmp_path / "g", tmp_path / "f", cfg, tiny_lm(tmp_path_factory), ref_texts, evq)
    assert counts["tg_dedup"]["reasons"] == {"near_duplicate:reference": 1, "near_duplicate:generated": 1}
    assert counts["decontam"]["reasons"] == {"eval_contamination:countbench": 1}
    man = export_generated(tmp_path / "g", tmp_path / "f", str(tmp_path / "x"), cfg)
    assert man["subset"] == "targeted_demo"
    exported = {i for s in man["shards"] for i in s["ids"]}
    assert generated_id("p004") in exported and len(exported) == 2  # p004 + one of the p001/p002 pair
    assert generated_id("p000") not in exported and generated_id("p003") not in exported
    # the Flyte export task, given the StepOuts filter_generated_samples returns (the generation as the run, one
    # StepOut per filter ledger, all in one folder), exports the same subset
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.file import FlyteFile

    from core.targeted.filters import FILTER_STEPS
    from tasks.export import export_dataset
    from tasks.types import StepOut

    filtered = FlyteDirectory(str(tmp_path / "f"))
    ex = export_dataset(run=StepOut(FILTER_STEPS[0], FlyteDirectory(str(tmp_path / "g"))),
                        steps=[StepOut(st, filtered) for st in FILTER_STEPS[1:]],
                        subset_ids=FlyteFile(str(tmp_path / "f" / "targeted" / "kept_ids.json")),
                        subset_name=cfg.subset_name)
    task_man = json.loads(Path(ex.dir.path, "manifest.json").read_text())
    assert {i for sh in task_man["shards"] for i in sh["ids"]} == exported and task_man["subset"] == "targeted_demo"


def test_resume_with_another_config_is_refused(tmp_path, pool):
    rows = _rows_for(pool, ["p000", "p001"], "count_like", 100)
    vlm = ScriptedVLM(lambda r: "Question: How many dots are there?\nAnswer: 2")
    generate_shards(rows, pool, tmp_path / "g", tiny_targeted_config("m"), EXAMPLES, generator=vlm)
    with pytest.raises(ValueError, match="another config"):
        generate_shards(rows, pool, tmp_path / "g", tiny_targeted_config("m", seed=1), EXAMPLES, generator=vlm)
    # a scheduling-only change resumes
    generate_shards(rows, pool, tmp_path / "g", tiny_targeted_config("m", max_parallel_shards=9), EXAMPLES, generator=vlm)


def test_merge_of_per_shard_outputs_keeps_every_ledger_part(tmp_path, pool):
    from core.targeted.pipeline import merge_generation

    rows = _rows_for(pool, [f"p{i:03d}" for i in range(6)], "count_like", 2)
    cfg = tiny_targeted_config("m", shard_size=2)
    vlm = ScriptedVLM(lambda r: f"Question: How many dots with seed {r.seed}?\nAnswer: {r.seed % 7}")
    for name in ("gen-000000", "gen-000001", "gen-000002"):  # one output dir per map task, as in Flyte
        generate_shards(rows, pool, tmp_path / name, cfg, EXAMPLES, shards=[name], generator=vlm)
    merged = merge_generation([tmp_path / n for n in ("gen-000000", "gen-000001", "gen-000002")], tmp_path / "m")
    assert sorted(read_ledger(step_dir(merged, STEP))["sample_id"]) == sorted(rows["gen_id"])
    assert len(list_shards(str(merged / "shards"))) == 3
    (tmp_path / "gen-000001" / "targeted" / "generate_config.json").write_text("{}")
    with pytest.raises(ValueError, match="differs"):
        merge_generation([tmp_path / "gen-000000", tmp_path / "gen-000001"], tmp_path / "m2")


def test_the_step_is_a_shard_step_and_an_empty_run_still_writes_its_ledger(tmp_path, pool):
    from core.foundation.step import ShardStep
    from core.targeted.generate import TargetedGenerateStep

    assert issubclass(TargetedGenerateStep, ShardStep) and TargetedGenerateStep.name == STEP
    rows = _retrieved([], "count_like")  # nothing retrieved: no unit, no model load (model "m" does not exist)
    assert generate_shards(rows, pool, tmp_path / "g", tiny_targeted_config("m"), EXAMPLES, generator=None) == []
    assert sorted(p.name for p in step_dir(tmp_path / "g", STEP).iterdir()) == ["_step.json", "part-empty.parquet"]
    check_balance(tmp_path / "g", [STEP])
