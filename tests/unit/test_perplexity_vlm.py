"""vlm mode with a tiny random LLaVA (mechanics only: masks, alignment, batching, pipeline)."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppl_helpers import clean_records, samples, tiny_lm  # noqa: E402

from core.foundation.sample import Sample, Turn  # noqa: E402
from core.steps.perplexity import PerplexityConfig  # noqa: E402
from core.steps.perplexity.vlm import HFVLMScorer, VLMScorer  # noqa: E402


def png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    lm = tiny_lm(tmp_path_factory)
    tok = AutoTokenizer.from_pretrained(lm)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).eval()
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    config = PerplexityConfig(model=lm, mode="vlm", device="cpu", dtype="float32", batch_tokens=300, max_length=200)
    return HFVLMScorer(config, proc, model)


def with_pixels(ss: list[Sample], color=(200, 10, 10)) -> list[Sample]:
    for s in ss:
        s.image_bytes = [png(color)] * len(s.images)
    return ss


def test_image_tokens_expanded_and_masked(vlm):
    assert isinstance(vlm, VLMScorer)
    s = with_pixels([Sample("a", [Turn("human", "<image>\nWhat color is the cat?"), Turn("gpt", "The cat is red."),
                                  Turn("human", "And <image> this?"), Turn("gpt", "Blue.")], images=["1", "2"])])[0]
    it = vlm.prepare(s)
    img = it.ids == vlm.image_id
    assert img.sum() == 2 * 4  # 2 images x (28/14)^2 patches (+ CLS, dropped by the "default" strategy)
    assert not (it.scored & img).any()
    runs = []
    cur: list[int] = []
    for i, m in zip(it.ids, it.scored):
        if m:
            cur.append(int(i))
        elif cur:
            runs, cur = runs + [vlm.tok.decode(cur)], []
    assert runs == ["The cat is red.", "Blue."]
    text_enc = vlm.encoder.encode(s)  # same scored tokens as assistant_only on the text
    assert it.ids[it.scored].tolist() == text_enc.input_ids[text_enc.scored].tolist()


def test_batched_equals_one_by_one_and_pixels_matter(vlm):
    ss = with_pixels(samples(clean_records(12, seed=2)))
    together = vlm.score(ss)
    alone = [vlm.score([s])[0] for s in ss]
    assert vlm.stats.n_batches > 2
    for a, b in zip(together, alone):
        assert a.n_scored == b.n_scored > 0
        assert abs(a.nll - b.nll) / abs(b.nll) <= 1e-4
    other = vlm.score(with_pixels(samples(clean_records(12, seed=2)), color=(10, 10, 250)))
    assert [o.n_scored for o in other] == [t.n_scored for t in together]
    assert any(abs(o.nll - t.nll) > 1e-6 for o, t in zip(other, together))  # the model sees the images


def test_too_long_and_missing_pixels(vlm):
    long = with_pixels([Sample("long", [Turn("human", "<image>\n" + "word " * 300), Turn("gpt", "Red.")],
                               images=["x"])])[0]
    nopix = Sample("nopix", [Turn("human", "<image>\nColor?"), Turn("gpt", "Red.")], images=["x"])
    a, b = vlm.score([long, nopix])
    assert a.n_scored == 0 and math.isnan(a.ppl) and a.reason == "ppl_no_scored_tokens:too_long" and a.truncated
    assert b.n_scored == 0 and b.reason == "ppl_vlm_missing_pixels"


def test_vlm_through_the_shard_pipeline(vlm, tmp_path):
    from core.foundation.ledger import read_ledger, step_dir
    from core.io.wds import list_shards, write_shards
    from core.steps.perplexity import score_shards

    ss = with_pixels(samples(clean_records(10, seed=4)))
    write_shards(ss, str(tmp_path / "shards"), max_samples=6)
    out = tmp_path / "out"
    summary = score_shards(list_shards(str(tmp_path / "shards")), out, vlm.cfg, scorer=vlm)
    led = read_ledger(step_dir(out, "perplexity"))
    assert (led.decision == "keep").sum() == 10 and np.isfinite(led.score).all()
    assert summary["batching"]["n_batches"] >= 2
