"""Early-signal metrics: likelihoods of known answers under teacher forcing, beside the published scores.

A tiny or briefly trained model rarely generates a right answer, so generation metrics read 0 for every variant;
the likelihood it gives the right answer still moves. Per item (every benchmark):

- `answer_nll`: mean negative log-likelihood per token of the gold answer given the image(s) and the benchmark's
  prompt, teacher-forced. For the built-in trainer's checkpoints the sequence is built by the trainer's own
  encoding (`core.train.data.encode_conversation`: ChatML, `<image>` expanded to one slot per patch, labels on
  the answer and its `<|im_end|>`), so the number is the trainer's validation loss measured on an eval item.
- `mc_choice` / `mc_correct` / `mc_gold_prob` (multiple-choice items only): lmms-eval's `multiple_choice` output
  type, the log-likelihood of each option as the continuation of the prompt (summed over the option's tokens,
  no end marker); the pick is the option with the highest one; `mc_gold_prob` is the gold option's share of
  the options' likelihoods (softmax over their log-likelihoods), a graded version of `mc_correct`.

Backends expose `loglikelihood(requests) -> list[Likelihood]`; a backend without it leaves the columns NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LikelihoodRequest:
    """One teacher-forced continuation: decoded PIL images, the prompt (no placeholders), the continuation.

    `end_turn`: the continuation is a whole assistant answer and its end-of-turn marker is scored too (the
    answer NLL, as the trainer's loss counts it); False scores the continuation's own tokens only (an option)."""

    images: list[Any]
    prompt: str
    continuation: str
    end_turn: bool = True


@dataclass(frozen=True)
class Likelihood:
    """Summed log-probability of a continuation's scored tokens, how many there were, and whether greedy
    decoding would have produced every one of them (lmms-eval's `is_greedy`)."""

    logprob: float
    n_tokens: int
    greedy: bool

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (NaN when no token was scored)."""
        return -self.logprob / self.n_tokens if self.n_tokens else float("nan")


def user_text(prompt: str, n_images: int, image_token: str = "<image>") -> str:
    """The user turn as the trainer's chat template renders it: one `<image>` per image, a newline, the text."""
    return image_token * n_images + ("\n" if n_images else "") + prompt


def trainer_encoding(tokenizer: Any, image_token_id: int, n_image_tokens: int, req: LikelihoodRequest,
                     max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one request by the trainer's own encoding (`encode_conversation`): the user turn
    with the prompt, the assistant turn with the continuation; labels on the continuation (and its `<|im_end|>`
    when `end_turn`). Raises ValueError when truncation to `max_len` cuts an image or the whole continuation."""
    from core.train.data import encode_conversation

    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    turns = [{"from": "human", "value": user_text(req.prompt, len(req.images), image_token)},
             {"from": "gpt", "value": req.continuation}]
    ids, labels, n_img = encode_conversation(tokenizer, turns, image_token_id, n_image_tokens, max_len)
    if n_img != len(req.images):
        raise ValueError(f"max_len={max_len} cuts the prompt's images ({n_img} of {len(req.images)} fit)")
    if not req.end_turn:  # an option is scored as a bare continuation: its end marker is not part of it
        end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        labels = [IGNORE_INDEX if i == end_id else lab for i, lab in zip(ids, labels, strict=True)]
    if all(lab == IGNORE_INDEX for lab in labels):
        raise ValueError(f"max_len={max_len} leaves no token of the continuation")
    return ids, labels


def sequence_likelihoods(logits: Any, labels: Any) -> list[Likelihood]:
    """Per row of a padded batch: the summed log-probability of the labelled tokens (predicted from the
    position before, as the trainer's loss), their count, and whether each is the argmax. `logits` [B, T, V],
    `labels` [B, T] with IGNORE_INDEX elsewhere. The softmax runs over the labelled positions only."""
    import torch

    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # [K, V]: labelled positions only
    picked = logp.gather(-1, tgt[mask].unsqueeze(-1)).squeeze(-1)
    hit = logp.argmax(-1) == tgt[mask]
    out = []
    for b in range(tgt.shape[0]):
        sel = rows == b
        out.append(Likelihood(float(picked[sel].sum()), int(sel.sum()), bool(hit[sel].all())))
    return out


def choice_stats(logprobs: Sequence[float], gold: int | None) -> tuple[int, float, float]:
    """(picked option index, 1.0/0.0 whether it is the gold one, the gold option's softmax share): lmms-eval's
    `multiple_choice` pick is the argmax of the summed log-likelihoods (first one on a tie)."""
    pick = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
    if gold is None:
        return pick, float("nan"), float("nan")
    top = max(logprobs)
    z = sum(math.exp(lp - top) for lp in logprobs)
    return pick, float(pick == gold), math.exp(logprobs[gold] - top) / z
