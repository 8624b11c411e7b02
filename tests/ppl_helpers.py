"""Shared test data for the perplexity tests: small clean conversations and a session-wide tiny LM."""

from __future__ import annotations

import random

from core.foundation.sample import Sample
from core.models.tiny_lm import ensure_tiny_lm

THINGS = ["cat", "dog", "chart", "table", "car", "tree", "person", "plane", "boat", "house"]
COLORS = ["red", "blue", "green", "yellow", "white"]


def clean_records(n: int, seed: int = 0, prefix: str = "c") -> list[dict]:
    """LLaVA records: an image question and a short templated answer (some two-turn)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t, c = rng.choice(THINGS), rng.choice(COLORS)
        conv = [{"from": "human", "value": f"<image>\nWhat color is the {t} in the picture?"},
                {"from": "gpt", "value": f"The {t} in the picture is {c}."}]
        if i % 3 == 0:
            conv += [{"from": "human", "value": f"Is the {t} big?"},
                     {"from": "gpt", "value": f"Yes, the {t} is big and {c}."}]
        out.append({"id": f"{prefix}{i:04d}", "image": f"{i}.jpg", "conversations": conv})
    return out


def garbled_records(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        junk = "".join(rng.choice("qxzjkvw#@%&") for _ in range(40))
        out.append({"id": f"g{i:04d}", "image": f"g{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nGenerate underlying data table of the chart."},
            {"from": "gpt", "value": junk}]})
    return out


def samples(records: list[dict]) -> list[Sample]:
    return [Sample.from_record(r) for r in records]


def training_texts(records: list[dict]) -> list:
    """What the tiny LM trains on: each conversation as chat messages and as plain text."""
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    out: list = []
    for r in records:
        out.append([{"role": role[t["from"]], "content": t["value"]} for t in r["conversations"]])
        out.append("\n".join(t["value"].replace("<image>\n", "") for t in r["conversations"]))
    return out


def tiny_lm(tmp_path_factory) -> str:
    """One tiny LM per test session (same dir + same key => trained once, reused by every module)."""
    return ensure_tiny_lm(tmp_path_factory.getbasetemp() / "tiny_lm_ppl", training_texts(clean_records(150)),
                          steps=60, vocab_size=400, hidden=64, seq_len=64)
