"""Batched perplexity scoring with a causal LM: length-bucketed batches under a token budget.

Samples are encoded (`core.steps.perplexity.encode`), sorted by length and cut into batches whose padded size
(rows x longest row) stays under `batch_tokens`, so padding waste stays small without a per-sample
loop. The loss is computed in float32 only at scored positions (no B x L x V float32 copy).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.foundation.sample import Sample
from core.steps.perplexity.config import PerplexityConfig
from core.steps.perplexity.encode import Encoded, EncodeError, Encoder

log = logging.getLogger(__name__)


@dataclass
class SampleScore:
    """Per-sample result. `nll` and `ppl` are NaN when `n_scored == 0` (then `reason` says why)."""

    sample_id: str
    nll: float
    ppl: float
    n_scored: int
    n_tokens: int
    truncated: bool
    reason: str = ""
    turn_nll: list[float] = field(default_factory=list)  # mean NLL per assistant turn (one entry in text mode)
    turn_tokens: list[int] = field(default_factory=list)  # scored tokens per assistant turn (0: truncated away)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BatchStats:
    """Throughput and padding of one scoring call (accumulates across calls with `+=`)."""

    n_samples: int = 0
    n_batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # rows x longest row, summed over batches
    scored_tokens: int = 0
    seconds: float = 0.0

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds else 0.0

    def __iadd__(self, o: BatchStats) -> BatchStats:
        for k in ("n_samples", "n_batches", "real_tokens", "padded_tokens", "scored_tokens", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        return self

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(padding_waste=round(self.padding_waste, 4), tokens_per_s=round(self.tokens_per_s, 1))
        return d


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when available else `cpu`; anything else is returned as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """`auto` -> bfloat16 on cuda, float32 elsewhere; or the named torch dtype."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(config: PerplexityConfig) -> tuple[Any, Any, str]:
    """Tokenizer, eval-mode causal LM on the configured device/dtype, and the resolved device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    tok = AutoTokenizer.from_pretrained(config.model)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{config.model}: a fast tokenizer is needed (character offsets for exact masks)")
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=resolve_dtype(config.dtype, device))
    model.to(device).eval()
    return tok, model, device


def make_batches(lengths: Sequence[int], batch_tokens: int, sort: bool = True, max_waste: float = 1.0) -> list[list[int]]:
    """Index batches with rows x longest row <= batch_tokens and padding waste <= max_waste per batch.

    Sorted longest first (an OOM shows on the first batch), ties by index, so batching is deterministic.
    A batch is closed early when the next (shorter) row would push its padding fraction over `max_waste`.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = total = 0
    for i in order:
        n = max(1, lengths[i])
        if cur:
            L = max(longest, n)
            if (len(cur) + 1) * L > batch_tokens or 1 - (total + n) / ((len(cur) + 1) * L) > max_waste:
                batches.append(cur)
                cur, longest, total = [], 0, 0
        cur.append(i)
        longest = max(longest, n)
        total += n
    if cur:
        batches.append(cur)
    return batches


class PerplexityScorer:
    """Loads the model once, then scores lists of samples in length-bucketed batches."""

    def __init__(self, config: PerplexityConfig, tokenizer: Any = None, model: Any = None):
        if config.mode == "vlm":
            raise ValueError("mode 'vlm' is scored by a VLMScorer (core.steps.perplexity.vlm), not PerplexityScorer")
        self.cfg = config
        if tokenizer is None or model is None:
            tokenizer, model, self.device = load_model(config)
        else:
            self.device = str(next(model.parameters()).device)
        self.tok, self.model = tokenizer, model
        self.encoder = Encoder(tokenizer, config)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.stats = BatchStats()
        self._split: Any = None  # (decoder, lm_head) shortcut, False when not exact, None until checked

    def encode(self, samples: Iterable[Sample]) -> tuple[list[Encoded], list[tuple[str, EncodeError]]]:
        """Encode samples; those that cannot be encoded come back as (id, error) to quarantine."""
        ok: list[Encoded] = []
        bad: list[tuple[str, EncodeError]] = []
        for s in samples:
            try:
                ok.append(self.encoder.encode(s))
            except EncodeError as e:
                bad.append((s.id, e))
        return ok, bad

    def score_encoded(self, encoded: Sequence[Encoded]) -> list[SampleScore]:
        """Scores in input order; samples without scored tokens get NaN without a forward pass."""
        import torch

        t0 = time.perf_counter()
        token_nll: dict[int, np.ndarray] = {}
        live = [i for i, e in enumerate(encoded) if e.n_scored > 0]
        stats = BatchStats(n_samples=len(encoded))
        batches = make_batches([len(encoded[i].input_ids) for i in live], self.cfg.batch_tokens, self.cfg.sort_buckets,
                               self.cfg.max_padding_waste if self.cfg.sort_buckets else 1.0)
        with torch.inference_mode():
            for b in batches:
                rows = [live[j] for j in b]
                for i, t in zip(rows, self._forward([encoded[i] for i in rows])):
                    token_nll[i] = t
                longest = max(len(encoded[i].input_ids) for i in rows)
                stats.n_batches += 1
                stats.real_tokens += sum(len(encoded[i].input_ids) for i in rows)
                stats.padded_tokens += longest * len(rows)
        out = []
        for i, e in enumerate(encoded):
            n = e.n_scored
            stats.scored_tokens += n
            nll = float(token_nll[i].sum() / n) if n else math.nan
            ppl = math.exp(nll) if n else math.nan
            turn_nll, turn_tokens = [], []
            if n:
                seg = e.segment[e.scored]
                cnt = np.bincount(seg, minlength=int(seg.max()) + 1)
                tot = np.bincount(seg, weights=token_nll[i], minlength=len(cnt))
                turn_tokens = cnt.tolist()
                turn_nll = [float(t / c) if c else math.nan for t, c in zip(tot, cnt)]
            out.append(SampleScore(e.sample_id, nll, ppl, n, len(e.input_ids), e.truncated, e.reason,
                                   turn_nll, turn_tokens))
        stats.seconds = time.perf_counter() - t0
        self.stats += stats
        return out

    def score_samples(self, samples: Iterable[Sample]) -> tuple[list[SampleScore], list[tuple[str, EncodeError]]]:
        """Encode and score; returns (scores of encodable samples, [(id, error)] of the others)."""
        enc, bad = self.encode(samples)
        return self.score_encoded(enc), bad

    def _forward(self, rows: Sequence[Encoded]) -> list[np.ndarray]:
        """Token NLLs at the scored positions (ascending) of each row of one padded batch."""
        import torch
        import torch.nn.functional as F

        L = max(len(e.input_ids) for e in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), L), dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.bool)
        for r, e in enumerate(rows):  # right padding: position ids stay 0..n-1 for every row
            n = len(e.input_ids)
            ids[r, :n] = torch.from_numpy(e.input_ids)
            att[r, :n] = 1
            mask[r, :n] = torch.from_numpy(e.scored)
        ids, att, mask = ids.to(self.device), att.to(self.device), mask.to(self.device)
        # position p's logits predict token p+1: gather the predicting positions of scored tokens
        row, pos = mask[:, 1:].nonzero(as_tuple=True)
        feats, head = self._scored_features(ids, att, row, pos)
        parts = []
        chunk = 4096  # LM head + float32 log-softmax over the vocab, a few thousand positions at a time
        for k in range(0, len(row), chunk):
            r, p = row[k : k + chunk], pos[k : k + chunk]
            parts.append(F.cross_entropy(head(feats[k : k + chunk]).float(), ids[r, p + 1], reduction="none"))
        nll = torch.cat(parts).double().cpu().numpy()
        # nonzero() is row-major: each row's scored positions are contiguous and ascending
        return np.split(nll, np.cumsum([e.n_scored for e in rows])[:-1])


    def _scored_features(self, ids: Any, att: Any, row: Any, pos: Any) -> tuple[Any, Any]:
        """(features at (row, pos), f) with logits = f(features). When the model is a plain
        `decoder -> lm_head` stack (checked numerically on the first batch) the features are hidden states
        and f the LM head, so the head runs only on scored positions, chunk by chunk; else the features
        are the full forward pass's logits and f the identity."""
        import torch

        def ident(x: Any) -> Any:
            return x

        if self._split is None:  # first batch: verify the shortcut against the full forward pass
            full = self.model(input_ids=ids, attention_mask=att, use_cache=False).logits[row, pos]
            split = _head_split(self.model)
            if split is not None:
                base, head = split
                h = base(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
                tol = 1e-4 if full.dtype == torch.float32 else 2e-2
                same = h.shape[:2] == ids.shape and torch.allclose(head(h[row, pos]).float(), full.float(), rtol=tol,
                                                                    atol=tol * full.float().abs().max().item())
                self._split = split if same else False
            else:
                self._split = False
            log.info("perplexity: LM head on scored positions only: %s", bool(self._split))
            return full, ident
        if self._split:
            base, head = self._split
            return base(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state[row, pos], head
        return self.model(input_ids=ids, attention_mask=att, use_cache=False).logits[row, pos], ident


def _head_split(model: Any) -> tuple[Any, Any] | None:
    """(decoder, lm_head) of a causal LM whose logits are exactly lm_head(decoder(...).last_hidden_state)."""
    cfg = model.config
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    base, head = getattr(model, "model", None), model.get_output_embeddings()
    if base is None or head is None:
        return None
    return base, head


def naive_scores(model: Any, encoded: Sequence[Encoded], device: str = "cpu") -> list[float]:
    """Reference: one sample at a time through the plain HF loss (`labels`, -100 = ignored). Mean NLLs.

    Used by tests and the benchmark as the baseline the batched scorer must agree with.
    """
    import torch

    out = []
    with torch.inference_mode():
        for e in encoded:
            if e.n_scored == 0:
                out.append(math.nan)
                continue
            ids = torch.from_numpy(e.input_ids)[None].to(device)
            labels = torch.from_numpy(e.labels())[None].to(device)
            out.append(float(model(input_ids=ids, labels=labels, use_cache=False).loss))
    return out
