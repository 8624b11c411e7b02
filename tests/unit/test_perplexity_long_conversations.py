"""Perplexity encoding is linear in the conversation length, and identical to the per-span reference.

The reference below is the previous encoder's skeleton split and mask marking, kept verbatim: one
`str.partition` per message and one full-length mask per assistant span and per `<image>` (quadratic in
turns). The fast encoder must give the same ids, scored mask and segments on every conversation shape.
"""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from capped import run_capped  # noqa: E402

from core.foundation.sample import Sample, Turn  # noqa: E402
from core.models.tiny_lm import build_tokenizer  # noqa: E402
from core.steps.perplexity import EncodeError, Encoder, tiny_perplexity_config  # noqa: E402
from core.steps.perplexity.encode import _IMAGE_RE, SKELETON_CACHE_TURNS, _sentinel, last_overlap  # noqa: E402

CORPUS = ["What color is the cat in the picture?", "The cat is red.", "Ünïcödé 猫 🐱 text", "<image>\nDescribe.",
          "<|im_start|>user\nhi<|im_end|>\n"] * 10
# No text between contents: a token can straddle two assistant contents (the last one wins).
BARE_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


class ReferenceEncoder(Encoder):
    """The previous encoder: quadratic skeleton split and one mask per span (the behaviour to keep)."""

    def _skeleton(self, roles):
        msgs = [{"role": r, "content": _sentinel(i)} for i, r in enumerate(roles)]
        rest = self._apply_template(msgs)
        pieces = []
        for i in range(len(roles)):
            head, sep, rest = rest.partition(_sentinel(i))
            if not sep or _sentinel(i) in rest:
                raise EncodeError("ppl_template_mismatch", f"template drops or repeats message {i} ({roles[i]})")
            pieces.append(head)
        pieces.append(rest)
        return pieces

    def _tokenize(self, text, spans, add_bos):
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        start, end = offs[:, 0], offs[:, 1]
        nonempty = end > start
        segment = np.full(len(ids), -1, dtype=np.int32)
        if spans is None:
            segment[nonempty] = 0
        else:
            for k, (s, e) in enumerate(spans):
                segment[nonempty & (start < e) & (end > s)] = k
        for m in _IMAGE_RE.finditer(text):
            segment[(start < m.end()) & (end > m.start())] = -1
        if add_bos and self.bos_id is not None and (len(ids) == 0 or ids[0] != self.bos_id):
            ids = np.concatenate([[self.bos_id], ids]).astype(np.int64)
            segment = np.concatenate([[-1], segment]).astype(np.int32)
        if len(segment):
            segment[0] = -1
        return ids, segment


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, vocab_size=400)


def conv(*pairs, images=0, sid="s"):
    return Sample(id=sid, conversations=[Turn(r, v) for r, v in pairs], images=[f"{i}.jpg" for i in range(images)])


def varied_conversations(n_random: int = 40) -> list[Sample]:
    fixed = [
        conv(("human", "<image>\nWhat color?"), ("gpt", "Red."), images=1),
        conv(("system", "Be brief."), ("human", "<image>\n<image>\nCompare."), ("gpt", "Left is red.<image>"),
             ("human", "And <image>?"), ("gpt", "Blue."), images=4),
        conv(("human", ""), ("gpt", ""), ("human", "x"), ("gpt", "")),  # empty turns: empty spans
        conv(("gpt", "first"), ("gpt", "second"), ("gpt", "third")),  # adjacent assistant contents
        conv(("human", "Ünïcödé 猫?"), ("gpt", "🐱🐱 猫猫"), ("system", "late system turn"), ("gpt", "é")),
        conv(("human", "<image>"), ("gpt", "<image>"), images=2),  # placeholder is the whole content
        conv(("human", "a"), ("gpt", "b" * 300)),  # truncated
    ]
    rng = random.Random(7)
    pool = ["", "a", " ", "\n", "cat", "The cat is red.", "<image>", "<image>\n", "猫", "🐱", "  spaced  ", "ab<image>cd"]
    out = list(fixed)
    for j in range(n_random):
        n = rng.randint(1, 12)
        roles = [rng.choice(["human", "gpt", "gpt", "system"]) for _ in range(n)]
        turns = [(r, "".join(rng.choice(pool) for _ in range(rng.randint(0, 4)))) for r in roles]
        out.append(conv(*turns, images=sum(v.count("<image>") for _, v in turns), sid=f"r{j}"))
    return out


CASES = [("assistant_only", "model", True), ("assistant_only", "model", False), ("assistant_only", "plain", True),
         ("assistant_only", "plain", False), ("assistant_only", "bare", True), ("text", "plain", True)]


@pytest.mark.parametrize("mode,template,keep", CASES)
def test_fast_encoding_equals_reference(tok, mode, template, keep):
    tok = tok if template != "bare" else _with_template(tok, BARE_TEMPLATE)
    cfg = replace(tiny_perplexity_config("m", mode=mode), chat_template="plain" if template == "plain" else "model",
                  keep_image_placeholders=keep)
    fast, ref = Encoder(tok, cfg), ReferenceEncoder(tok, cfg)
    for s in varied_conversations():
        a, b = fast.encode(s), ref.encode(s)
        assert a.input_ids.tolist() == b.input_ids.tolist(), s
        assert a.segment.tolist() == b.segment.tolist(), s
        assert a.scored.tolist() == b.scored.tolist() and (a.truncated, a.n_tokens_full, a.reason) == (
            b.truncated, b.n_tokens_full, b.reason)


def _with_template(tok, template):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def test_last_overlap_matches_per_span_masks_on_random_intervals():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts = np.sort(rng.integers(0, 60, size=2 * rng.integers(0, 8)))
        spans = [(int(cuts[i]), int(cuts[i + 1])) for i in range(0, len(cuts), 2)]  # sorted, disjoint, some empty
        start = rng.integers(0, 60, size=50)
        end = start + rng.integers(0, 6, size=50)
        want = np.full(50, -1)
        for k, (s, e) in enumerate(spans):
            want[(start < e) & (end > s)] = k
        assert last_overlap(start, end, spans).tolist() == want.tolist(), spans


def test_last_overlap_rejects_unsorted_spans():
    with pytest.raises(ValueError, match="sorted"):
        last_overlap(np.array([0]), np.array([1]), [(5, 6), (1, 2)])


@pytest.mark.parametrize("template,message", [
    ("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}", "repeats message 0"),
    ("{% for m in messages[1:] %}{{ m['content'] }}{% endfor %}", "drops message 0"),
    ("{% for m in messages[:-1] %}{{ m['content'] }}{% endfor %}", "drops message 2"),
])
def test_skeleton_that_drops_or_repeats_a_message_is_quarantined(tok, template, message):
    cfg = replace(tiny_perplexity_config("m"), chat_template="model")
    enc = Encoder(_with_template(tok, template), cfg)
    with pytest.raises(EncodeError, match=message) as e:
        enc.encode(conv(("human", "q"), ("gpt", "a"), ("human", "q2")))
    assert e.value.reason == "ppl_template_mismatch"


def test_skeleton_cache_is_bounded_and_skips_long_role_sequences(tok):
    enc = Encoder(tok, replace(tiny_perplexity_config("m"), chat_template="model"))
    for n in range(1, SKELETON_CACHE_TURNS + 40):
        enc.encode(conv(*[("human" if i % 2 == 0 else "gpt", "a") for i in range(n)]))
    info = enc._cached_skeleton.cache_info()
    assert info.currsize == SKELETON_CACHE_TURNS and info.maxsize is not None


def _encode_many_turns(n_turns: int, template: str) -> dict:
    tok = build_tokenizer(CORPUS, vocab_size=400)
    cfg = replace(tiny_perplexity_config("m"), chat_template=template)
    s = conv(*[("human" if i % 2 == 0 else "gpt", "a") for i in range(n_turns)])
    e = Encoder(tok, cfg).encode(s)
    return {"n_tokens_full": e.n_tokens_full, "n_scored": e.n_scored, "truncated": e.truncated}


@pytest.mark.parametrize("template", ["model", "plain"])
def test_40000_one_character_turns_encode_under_a_memory_cap(template):
    # before: quadratic (40,000 turns took 75-85 s on the dev box, ~5 s now); the
    # time limit makes a regression fail
    res = run_capped(_encode_many_turns, 40_000, template, headroom_mb=2048, timeout_s=60)
    assert res.value["truncated"] and res.value["n_scored"] > 0 and res.value["n_tokens_full"] > 300_000
    assert res.grown_mb < 500
