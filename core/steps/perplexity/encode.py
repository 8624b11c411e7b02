"""Turn a Sample into token ids and an exact "scored" mask, per perplexity mode.

Conventions: `scored[i]` is True when token i is predicted (from tokens < i) and counts in the loss;
`scored[0]` is always False (nothing predicts the first token). Never scored, in any mode: image
placeholder tokens (any token overlapping a `<image>` occurrence), template tokens, human/system
turns in `assistant_only`, padding.

`assistant_only` spans are exact by construction: the chat template is rendered once with private-use
sentinels in place of the message contents (a skeleton that depends only on the roles), the real
contents are spliced in at the sentinels (so each content's character span is known), and the result
must equal the template's own rendering of the real messages, else the sample is quarantined
(`ppl_template_mismatch`: e.g. a template that rewrites content; `ppl_template_error` when the template
itself raises, e.g. on a system turn). Token i is scored when its character
span (tokenizer offsets) overlaps an assistant content span (the last one, when it overlaps two).

Cost is linear in the conversation's length, however many turns it has (a 40,000-turn conversation
encodes in about a second): the skeleton is split at its sentinels in one regex pass, and tokens are
matched to the sorted, disjoint content spans (and `<image>` occurrences) by binary search instead of
one full-length mask per span. Skeletons are cached for short role sequences only, in a bounded LRU.

Plain template (used when the tokenizer has no chat template, or `chat_template="plain"`)::

    System: {content}\\n\\n          (only for a system turn)
    User: {content}\\n\\n
    Assistant: {content}\\n\\n

preceded by the tokenizer's BOS token when it has one (`add_bos`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.foundation.sample import IMAGE_TOKEN, Sample, strip_image_placeholders
from core.steps.perplexity.config import PerplexityConfig

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_IMAGE_RE = re.compile(re.escape(IMAGE_TOKEN))
_SENTINEL_RE = re.compile("\ue000([0-9]+)\ue001")
# Skeletons depend only on the role sequence; real data has a handful of short ones. Longer sequences are
# split on the fly (linear) rather than cached, so a stream of long, distinct conversations holds no memory.
SKELETON_CACHE_TURNS = 64
SKELETON_CACHE_SIZE = 1024


class EncodeError(ValueError):
    """A sample that cannot be encoded for scoring; `reason` is the ledger code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Encoded:
    """One sample ready for the model: ids, scored mask (same length), truncation and zero-score facts."""

    sample_id: str
    input_ids: np.ndarray  # int64, after truncation
    scored: np.ndarray  # bool, same length
    segment: np.ndarray  # int32, same length: assistant turn index of a scored token (0 in text mode), else -1
    truncated: bool
    n_tokens_full: int  # before truncation
    reason: str = ""  # why nothing is scored (n_scored == 0), else ""

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    def labels(self) -> np.ndarray:
        """HF-style labels: the token id where scored, -100 elsewhere."""
        return np.where(self.scored, self.input_ids, -100)


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"


class Encoder:
    """Encodes samples for one tokenizer and config (holds the chat-template skeleton cache)."""

    def __init__(self, tokenizer: Any, config: PerplexityConfig):
        self.tok = tokenizer
        self.cfg = config
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if config.chat_template == "model" and not has_template:
            raise ValueError(f"tokenizer of {config.model} has no chat template (use chat_template='auto' or 'plain')")
        self.use_model_template = has_template and config.chat_template != "plain"
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_id = bos if (config.add_bos if config.add_bos is not None else bos is not None) else None
        self._cached_skeleton = functools.lru_cache(maxsize=SKELETON_CACHE_SIZE)(self._build_skeleton)

    # ---- public --------------------------------------------------------------------------------
    def encode(self, sample: Sample) -> Encoded:
        """Ids + scored mask for `sample` in the configured mode (raises EncodeError)."""
        if self.cfg.mode == "text":
            text, spans, add_bos = self._text_view(sample), None, True
        elif self.cfg.mode == "assistant_only":
            text, spans = self.render(sample)
            add_bos = not self.use_model_template  # a model's template adds its own BOS when it wants one
        else:
            raise EncodeError("ppl_mode_unsupported", f"mode {self.cfg.mode} is not token-encoded")
        ids, segment = self._tokenize(text, spans, add_bos)
        return self._truncate(sample.id, ids, segment)

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        """The sample as chat messages (roles user/assistant/system)."""
        keep = self.cfg.keep_image_placeholders
        return [
            {"role": ROLE_MAP[t.role], "content": t.value if keep else strip_image_placeholders(t.value)}
            for t in sample.conversations
        ]

    def render(self, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
        """The templated conversation and the character spans of its assistant contents."""
        msgs = self.messages(sample)
        if not self.use_model_template:
            return _render_plain(msgs)
        pieces = self._skeleton(tuple(m["role"] for m in msgs))
        out: list[str] = [pieces[0]]
        spans: list[tuple[int, int]] = []
        pos = len(pieces[0])
        for m, after in zip(msgs, pieces[1:]):
            if m["role"] == "assistant":
                spans.append((pos, pos + len(m["content"])))
            out += [m["content"], after]
            pos += len(m["content"]) + len(after)
        text = "".join(out)
        real = self._apply_template(msgs)
        if real != text:
            raise EncodeError("ppl_template_mismatch", "chat template does not insert contents verbatim")
        return text, spans

    # ---- internals -----------------------------------------------------------------------------
    def _text_view(self, sample: Sample) -> str:
        view = self.cfg.text_view
        turns = sample.conversations
        if view == "assistant":
            parts = [t.value for t in turns if t.is_assistant]
        elif view == "all_human":
            parts = [t.value for t in turns if t.is_human]
        else:
            parts = [t.value for t in turns]
        return "\n".join(p for p in (strip_image_placeholders(v) for v in parts) if p)

    def _skeleton(self, roles: tuple[str, ...]) -> list[str]:
        """The template's text around each message: `pieces[i]` precedes message i, `pieces[-1]` ends it."""
        if len(roles) <= SKELETON_CACHE_TURNS:
            return self._cached_skeleton(roles)
        return self._build_skeleton(roles)

    def _build_skeleton(self, roles: tuple[str, ...]) -> list[str]:
        msgs = [{"role": r, "content": _sentinel(i)} for i, r in enumerate(roles)]
        skel = self._apply_template(msgs)
        pieces: list[str] = []
        pos = 0
        for m in _SENTINEL_RE.finditer(skel):  # one pass; sentinels must come back once each, in order
            i = int(m.group(1))
            if i != len(pieces):
                bad = i if i < len(pieces) else len(pieces)
                what = "repeats" if i < len(pieces) else "drops"
                raise EncodeError("ppl_template_mismatch", f"template {what} message {bad} ({roles[bad]})")
            pieces.append(skel[pos:m.start()])
            pos = m.end()
        if len(pieces) != len(roles):
            raise EncodeError("ppl_template_mismatch",
                              f"template drops message {len(pieces)} ({roles[len(pieces)]})")
        pieces.append(skel[pos:])
        return pieces

    def _apply_template(self, msgs: list[dict[str, str]]) -> str:
        import jinja2

        try:
            return self.tok.apply_chat_template(msgs, tokenize=False)
        except jinja2.TemplateError as e:  # e.g. a template that rejects a system turn: quarantine, not crash
            raise EncodeError("ppl_template_error", str(e)[:200]) from None

    def _tokenize(self, text: str, spans: list[tuple[int, int]] | None, add_bos: bool) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and per-token segment (-1 = not scored, k = k-th assistant span, 0 in text mode)."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        start, end = offs[:, 0], offs[:, 1]
        nonempty = end > start
        segment = np.full(len(ids), -1, dtype=np.int32)
        if spans is None:  # text mode: every real token
            segment[nonempty] = 0
        else:
            k = last_overlap(start, end, spans)
            segment[nonempty] = k[nonempty]
        images = [m.span() for m in _IMAGE_RE.finditer(text)]
        if images:  # placeholders never count, whatever the tokenizer does with them
            segment[last_overlap(start, end, images) >= 0] = -1
        if add_bos and self.bos_id is not None and (len(ids) == 0 or ids[0] != self.bos_id):
            ids = np.concatenate([[self.bos_id], ids]).astype(np.int64)
            segment = np.concatenate([[-1], segment]).astype(np.int32)
        if len(segment):
            segment[0] = -1
        return ids, segment

    def _truncate(self, sid: str, ids: np.ndarray, segment: np.ndarray) -> Encoded:
        n = len(ids)
        had = bool((segment >= 0).any())
        truncated = n > self.cfg.max_length
        if truncated:
            sl = slice(n - self.cfg.max_length, n) if self.cfg.truncation_side == "left" else slice(0, self.cfg.max_length)
            ids, segment = ids[sl], segment[sl].copy()
            segment[0] = -1
        scored = segment >= 0
        reason = ""
        if not scored.any():
            reason = "ppl_no_scored_tokens:truncated" if (had and truncated) else "ppl_no_scored_tokens"
        return Encoded(sid, ids, scored, segment, truncated, n, reason)


def _render_plain(msgs: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in msgs:
        head = f"{PLAIN_ROLE_NAMES[m['role']]}: "
        pos += len(head)
        if m["role"] == "assistant":
            spans.append((pos, pos + len(m["content"])))
        out += [head, m["content"], "\n\n"]
        pos += len(m["content"]) + 2
    return "".join(out), spans


def last_overlap(start: np.ndarray, end: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Per token, the index of the last span that overlaps [start, end) (`start < e and end > s`), else -1.

    `spans` must be sorted and disjoint (both ends non-decreasing), as content spans and regex matches
    are: then the spans that start before a token's end are a prefix, those that end after its start are
    a suffix, and the last overlapping one is the prefix's last if it overlaps at all. One binary search
    per token: O(tokens * log(spans)), where a mask per span costs O(tokens * spans).
    """
    if not spans:
        return np.full(len(start), -1, dtype=np.int32)
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    s, e = bounds[:, 0], bounds[:, 1]
    if (np.diff(s) < 0).any() or (np.diff(e) < 0).any() or (e < s).any():
        raise ValueError("spans must be sorted and disjoint")
    k = np.searchsorted(s, end, side="left") - 1  # last span starting before the token ends
    hit = k >= 0
    hit[hit] = e[k[hit]] > start[hit]
    return np.where(hit, k, -1).astype(np.int32)
