"""Early-signal metrics (core/evals/likelihood.py): the answer NLL checked against a by-hand computation on a tiny
trainer checkpoint, lmms-eval's multiple-choice pick, and the metrics in records, results.json and samples JSONL
for every benchmark."""

from __future__ import annotations

import json
import math
import os

import pytest

from core.evals.likelihood import Likelihood, LikelihoodRequest, choice_stats


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import core.train.mini_llava as mini
    import tests.export_train_fixtures as fx

    root = tmp_path_factory.mktemp("early")
    name = fx.register_tiny_clip(root)
    lm = fx.make_tiny_lm(root / "lm")
    d = root / "ckpts" / "epoch-0001"
    mini.build_mini_llava(name, lm, device="cpu", seed=3).save(d)
    return str(d)


def _image():
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (48, 40), (255, 255, 255))
    ImageDraw.Draw(im).ellipse([10, 10, 24, 24], fill=(220, 30, 30))
    return im


def test_answer_nll_equals_a_by_hand_teacher_forced_loss(ckpt):
    """Tokens built by hand (ChatML, one `<image>` slot per patch), logits from the model, the NLL of the answer
    tokens and the end marker computed with torch: the backend's number is the same, and so is the trainer's
    own summed loss over its labels."""
    import torch

    from core.evals.backends import load_backend
    from core.train.mini_llava import load_mini_llava

    backend = load_backend("auto", ckpt, "cpu")
    img, prompt, answer = _image(), "How many red circles are there?", "1 circle"
    got = backend.loglikelihood([LikelihoodRequest([img], prompt, answer, end_turn=True)])[0]

    model = load_mini_llava(ckpt)
    tok = model.tokenizer
    n_img = model.n_image_tokens

    def toks(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    context = toks("<|im_start|>user\n") + [model.image_token_id] * n_img + toks("\n" + prompt + "<|im_end|>\n")
    context += toks("<|im_start|>assistant\n")
    target = toks(answer + "<|im_end|>")
    ids = torch.tensor([context + target + toks("\n")])
    pix = model.preprocess(img).unsqueeze(0)
    with torch.no_grad():
        logits = model.logits(ids, torch.ones_like(ids), pix)[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        by_hand = -sum(float(logp[len(context) + k - 1, t]) for k, t in enumerate(target)) / len(target)
        labels = torch.full_like(ids, -100)
        labels[0, len(context): len(context) + len(target)] = torch.tensor(target)
        loss_sum, n = model(ids, torch.ones_like(ids), labels, pix)
    assert got.n_tokens == len(target) == int(n)
    assert got.nll == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    assert got.nll == pytest.approx(float(loss_sum) / int(n), rel=1e-4, abs=1e-5)
    # an option is a bare continuation: its end marker is not scored
    opt = backend.loglikelihood([LikelihoodRequest([img], prompt, answer, end_turn=False)])[0]
    assert opt.n_tokens == len(target) - 1
    assert -opt.logprob == pytest.approx(-sum(float(logp[len(context) + k - 1, t])
                                              for k, t in enumerate(target[:-1])), rel=1e-4, abs=1e-5)


def test_batched_likelihoods_match_one_at_a_time(ckpt):
    """Right padding in a batch changes nothing (different lengths, one and two images)."""
    from core.evals.backends import load_backend

    backend = load_backend("auto", ckpt, "cpu")
    img = _image()
    reqs = [LikelihoodRequest([img], "count", "3"), LikelihoodRequest([img, img], "compare the two images",
                                                                       "they are the same picture of a circle"),
            LikelihoodRequest([img], "pick", "B", end_turn=False)]  # fmt: skip
    batch = backend.loglikelihood(reqs)
    alone = [backend.loglikelihood([r])[0] for r in reqs]
    for a, b in zip(batch, alone, strict=True):
        assert a.n_tokens == b.n_tokens and a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-4)


def test_choice_stats_is_argmax_with_softmax_share():
    pick, correct, share = choice_stats([-3.0, -1.0, -2.0], gold=1)
    assert pick == 1 and correct == 1.0
    assert share == pytest.approx(math.exp(-1) / (math.exp(-3) + math.exp(-1) + math.exp(-2)))
    assert choice_stats([-1.0, -1.0], gold=1)[:2] == (0, 0.0)  # a tie goes to the first option
    assert math.isnan(choice_stats([-1.0, -2.0], gold=None)[1])
    assert Likelihood(-6.0, 3, False).nll == 2.0 and math.isnan(Likelihood(0.0, 0, True).nll)


def test_every_benchmark_reports_early_signal_in_results_and_samples(ckpt, tmp_path):
    from core.demo.eval_fixtures import write_fixtures
    from core.evals import tiny_eval_config
    from core.evals.runner import evaluate_checkpoints

    cache = str(tmp_path / "cache")
    write_fixtures(cache)
    cfg = tiny_eval_config(cache)
    res = evaluate_checkpoints([ckpt], cfg, str(tmp_path / "out"))
    r = res.records
    loaded = r[~r["error"].str.startswith(("load_error", "corrupt_image"))]
    assert set(loaded["benchmark"]) == set(cfg.benchmarks)
    assert loaded["answer_nll"].gt(0).all() and loaded["answer_tokens"].gt(0).all()  # every item, every benchmark
    mc = r[r["benchmark"] == "realworldqa"]
    letters = mc[mc["mc_correct"].notna()]
    assert len(letters) == 3 and set(letters["mc_choice"]) <= {"A", "B", "C"}  # the free-form item is not MC
    assert letters["mc_gold_prob"].between(0, 1).all()
    assert mc["mc_correct"].isna().sum() == 1
    s = res.summary.set_index("benchmark")
    for b in cfg.benchmarks:
        assert s.loc[b, "answer_nll"] == pytest.approx(loaded.loc[loaded["benchmark"] == b, "answer_nll"].mean())
    assert s.loc["realworldqa", "n_mc"] == 3 and s.loc["countbench", "n_mc"] == 0

    doc = json.load(open(tmp_path / "out" / "results.json"))
    results = next(iter(doc["checkpoints"].values()))["results"]
    for b in cfg.benchmarks:
        assert results[b]["answer_nll,none"] == pytest.approx(s.loc[b, "answer_nll"])
        assert "answer_nll_stderr,none" in results[b]
    assert "mc_acc,none" in results["realworldqa"] and "mc_acc,none" not in results["docvqa"]
    wdir = res.worker_dirs[0]
    lines = [json.loads(x) for x in open(os.path.join(wdir, "lmms_eval", "samples_docvqa.jsonl"))]
    assert all(x["answer_nll"] > 0 and "anls" in x for x in lines)  # beside the published metric, never instead


def test_a_failing_likelihood_is_isolated_to_its_item():
    """One item whose likelihood raises gets NaN and an error in details; the batch's other items keep theirs;
    a backend without `loglikelihood` gets NaN and no error."""
    from core.evals.backends import GenRequest
    from core.evals.base import EvalItem
    from core.evals.registry import get_benchmark
    from core.evals.runner import early_signal

    class Backend:
        def loglikelihood(self, reqs):
            if any(r.prompt.startswith("bad") for r in reqs):
                raise RuntimeError("boom")
            return [Likelihood(-2.0 * len(r.continuation), len(r.continuation), True) for r in reqs]

    bench = get_benchmark("chartqa")
    items = [(EvalItem(f"i{k}", [], q, "12"), GenRequest([], q, 4)) for k, q in enumerate(["ok", "bad", "fine"])]
    out = early_signal(Backend(), bench, items)
    assert [o[0]["answer_nll"] for o in out][0] == 2.0 and out[2][0]["answer_nll"] == 2.0
    assert math.isnan(out[1][0]["answer_nll"]) and out[1][1].startswith("likelihood_error:RuntimeError")
    none = early_signal(object(), bench, items)  # type: ignore[arg-type]
    assert all(math.isnan(o[0]["answer_nll"]) and o[1] == "" for o in none)
