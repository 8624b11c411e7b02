"""The `vlm` mode: score assistant turns with a vision-language model that sees the images.

`VLMScorer` is the interface `score_shards(..., scorer=)` accepts (samples arrive with `image_bytes`).
`HFVLMScorer` implements it for Hugging Face image-text-to-text models whose processor expands each
`<image>` placeholder in place into a run of image tokens (LLaVA-style processors).

Masks: the conversation is rendered and tokenized by the same `Encoder` as `assistant_only` (exact
assistant spans, placeholders kept); the processor's expanded ids are then aligned token by token with
that encoding: every image token gets label -100, every other token must match the text encoding (else
the sample is quarantined `ppl_vlm_alignment`) and inherits its scored flag. No truncation inside
image runs: a sample longer than `max_length` after expansion is reported with zero scored tokens and
reason `ppl_no_scored_tokens:too_long`. The tokenizer's chat template is used (string contents with
inline `<image>`), else the plain template.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from core.foundation.sample import Sample
    from core.steps.perplexity.config import PerplexityConfig
    from core.steps.perplexity.scorer import SampleScore

log = logging.getLogger(__name__)


@runtime_checkable
class VLMScorer(Protocol):
    """Scores samples with images; one `SampleScore` per input sample, in order.

    Contract: image tokens and non-assistant spans never count (label -100); `n_scored == 0` gives NaN
    with a `ppl_no_scored_tokens[...]` reason; `truncated` says whether the sequence was cut.
    """

    def score(self, samples: Sequence[Sample]) -> list[SampleScore]: ...


@dataclass
class _Item:
    sample_id: str
    ids: np.ndarray
    scored: np.ndarray
    vision: dict[str, Any]  # processor outputs other than text (pixel_values, image_sizes, ...)
    reason: str = ""


class HFVLMScorer:
    """`VLMScorer` for HF image-text-to-text models (AutoProcessor + AutoModelForImageTextToText).

    Pass `processor` and `model` to reuse loaded objects; otherwise both load from `config.model` on the
    configured device/dtype. Batches are length-bucketed like the text scorer's.
    """

    def __init__(self, config: PerplexityConfig, processor: Any = None, model: Any = None):
        from core.steps.perplexity.encode import Encoder
        from core.steps.perplexity.scorer import BatchStats, resolve_device, resolve_dtype

        self.cfg = config
        if processor is None or model is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.device = resolve_device(config.device)
            processor = AutoProcessor.from_pretrained(config.model)
            model = AutoModelForImageTextToText.from_pretrained(config.model,
                                                                dtype=resolve_dtype(config.dtype, self.device))
            model.to(self.device).eval()
        else:
            self.device = str(next(model.parameters()).device)
        self.proc, self.model = processor, model
        self.tok = processor.tokenizer
        self.image_id = int(processor.image_token_id)
        # no truncation at the text level: image runs must stay whole (checked after expansion)
        self.encoder = Encoder(self.tok, replace(config, mode="assistant_only", keep_image_placeholders=True,
                                                 max_length=1 << 30, batch_tokens=1 << 30))
        pad = self.tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.tok.eos_token_id or 0)
        self.stats = BatchStats()

    # ---- encoding ------------------------------------------------------------------------------
    def prepare(self, sample: Sample) -> _Item:
        """Expanded ids, scored mask and vision inputs of one sample (raises EncodeError)."""
        from core.io.images import decode_image
        from core.steps.perplexity.encode import EncodeError

        text, spans = self.encoder.render(sample)
        ids, segment = self.encoder._tokenize(text, spans, add_bos=not self.encoder.use_model_template)
        images = [decode_image(b) for b in sample.image_bytes]
        if len(images) != len(sample.images):
            raise EncodeError("ppl_vlm_missing_pixels", f"{len(sample.images)} images, {len(images)} loaded")
        out = self.proc(text=[text], images=images or None, return_tensors="pt")
        exp = out["input_ids"][0].numpy().astype(np.int64)
        scored = _align(ids, segment >= 0, exp, self.image_id, self.tok.bos_token_id)
        if scored is None:
            raise EncodeError("ppl_vlm_alignment", "processor ids do not match the text encoding")
        vision = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
        item = _Item(sample.id, scored[1], scored[0], vision)
        if len(item.ids) > self.cfg.max_length:
            item.scored = np.zeros(len(item.ids), dtype=bool)
            item.reason = "ppl_no_scored_tokens:too_long"
        elif not item.scored.any():
            item.reason = "ppl_no_scored_tokens"
        return item

    # ---- scoring -------------------------------------------------------------------------------
    def score(self, samples: Sequence[Sample]) -> list[SampleScore]:
        """Scores in input order. Samples that cannot be prepared get NaN and the error's reason."""
        import torch

        from core.steps.perplexity.encode import EncodeError
        from core.steps.perplexity.scorer import BatchStats, SampleScore, make_batches

        t0 = time.perf_counter()
        items: list[_Item | None] = []
        errors: dict[int, str] = {}
        for k, s in enumerate(samples):
            try:
                items.append(self.prepare(s))
            except EncodeError as e:
                items.append(None)
                errors[k] = e.reason
        live = [k for k, it in enumerate(items) if it is not None and it.scored.any()]
        sums: dict[int, float] = {}
        stats = BatchStats(n_samples=len(samples))
        lengths = [len(items[k].ids) for k in live]
        with torch.inference_mode():
            for b in make_batches(lengths, self.cfg.batch_tokens, self.cfg.sort_buckets,
                                  self.cfg.max_padding_waste if self.cfg.sort_buckets else 1.0):
                rows = [live[j] for j in b]
                for k, v in zip(rows, self._forward([items[k] for k in rows])):
                    sums[k] = v
                stats.n_batches += 1
                stats.real_tokens += sum(len(items[k].ids) for k in rows)
                stats.padded_tokens += max(len(items[k].ids) for k in rows) * len(rows)
        out = []
        for k, s in enumerate(samples):
            it = items[k]
            if it is None:
                out.append(SampleScore(s.id, math.nan, math.nan, 0, 0, False, errors[k]))
                continue
            n = int(it.scored.sum())
            stats.scored_tokens += n
            nll = sums[k] / n if n else math.nan
            out.append(SampleScore(s.id, nll, math.exp(nll) if n else math.nan, n, len(it.ids),
                                   bool(it.reason == "ppl_no_scored_tokens:too_long"), it.reason))
        stats.seconds = time.perf_counter() - t0
        self.stats += stats
        return out

    def _forward(self, rows: Sequence[_Item]) -> list[float]:
        import torch
        import torch.nn.functional as F

        L = max(len(it.ids) for it in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), L), dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.bool)
        for r, it in enumerate(rows):
            ids[r, : len(it.ids)] = torch.from_numpy(it.ids)
            att[r, : len(it.ids)] = 1
            mask[r, : len(it.ids)] = torch.from_numpy(it.scored)
        vision: dict[str, Any] = {}
        for key in {k for it in rows for k in it.vision}:  # images of the batch, in row order
            parts = [it.vision[key] for it in rows if key in it.vision]
            vision[key] = torch.cat(parts).to(self.device)
        if "pixel_values" in vision:
            vision["pixel_values"] = vision["pixel_values"].to(self.model.dtype)
        ids, att, mask = ids.to(self.device), att.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=att, use_cache=False, **vision).logits
        row, pos = mask[:, 1:].nonzero(as_tuple=True)
        nll = F.cross_entropy(logits[row, pos].float(), ids[row, pos + 1], reduction="none").double()
        sums = torch.zeros(len(rows), dtype=torch.float64, device=ids.device).index_add_(0, row, nll)
        return sums.cpu().tolist()


def _align(ids: np.ndarray, scored: np.ndarray, exp: np.ndarray, image_id: int,
           bos_id: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Transfer the scored mask of the text encoding `ids` onto the processor's expanded ids `exp`.

    Returns (scored mask, expanded ids) or None when the sequences differ outside image runs. A BOS
    present on one side only is reconciled by prepending it to `exp` (the text encoding decides).
    """
    exp = np.asarray(exp, dtype=np.int64)
    if bos_id is not None and len(ids) and ids[0] == bos_id and (len(exp) == 0 or exp[0] != bos_id):
        exp = np.concatenate([[bos_id], exp]).astype(np.int64)
    if bos_id is not None and len(exp) and exp[0] == bos_id and (len(ids) == 0 or ids[0] != bos_id):
        exp = exp[1:]
    text_only = exp[exp != image_id]
    if not np.array_equal(text_only, ids[ids != image_id]):
        return None
    out = np.zeros(len(exp), dtype=bool)
    out[np.flatnonzero(exp != image_id)] = scored[ids != image_id]
    out[0] = False
    return out, exp
