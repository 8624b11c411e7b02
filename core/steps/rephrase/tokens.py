"""Token counting with the training tokenizer (text tokens only: image placeholders are removed, since
the same images cost the same tokens before and after rephrasing)."""

from __future__ import annotations

from collections.abc import Sequence

from core.foundation.sample import Turn, strip_image_placeholders


class TokenCounter:
    """Counts a conversation's text tokens with a HF tokenizer loaded from a local directory."""

    def __init__(self, tokenizer_path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.path = tokenizer_path

    def count(self, conversations: Sequence[Sequence[Turn]]) -> list[int]:
        """Total text tokens of each conversation (one batched tokenizer call for all turns)."""
        texts, owner = [], []
        for i, turns in enumerate(conversations):
            for t in turns:
                texts.append(strip_image_placeholders(t.value))
                owner.append(i)
        out = [0] * len(conversations)
        if texts:
            ids = self.tok(texts, add_special_tokens=False)["input_ids"]
            for i, x in zip(owner, ids):
                out[i] += len(x)
        return out
