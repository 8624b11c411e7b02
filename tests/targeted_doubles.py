"""Test doubles for targeted generation (tests only): a scripted-echo VLM that replies with given text
(exercises the parsing and filter paths), and a wrapper that dies after N shards (a killed worker)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from core.foundation.sample import Sample
from core.steps.rephrase.generate import Generation
from core.targeted.vlm import VLMRequest


class ScriptedVLM:
    """Replies `script(request)` for each request (finish reason `stop`); counts calls."""

    def __init__(self, script: Callable[[VLMRequest], str], name: str = "scripted"):
        self.script, self.name, self.calls = script, name, 0

    def generate(self, requests: Sequence[VLMRequest]) -> list[Generation]:
        self.calls += 1
        return [Generation(t, "stop", len(t.split())) for t in map(self.script, requests)]


class Killed(RuntimeError):
    pass


class DiesAfter:
    """Delegates to `inner` for `n` generate calls (one per shard), then raises `Killed`."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.name = inner, n, inner.name

    def generate(self, requests):
        if self.n <= 0:
            raise Killed("worker killed")
        self.n -= 1
        return self.inner.generate(requests)


def png(seed: int, size: int = 48) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def pool_samples(n: int, prefix: str = "p", source: str = "pool") -> list[Sample]:
    out = []
    for i in range(n):
        s = Sample.from_record({"id": f"{prefix}{i:03d}", "image": f"{prefix}{i:03d}.png", "source": source,
                                "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                  {"from": "gpt", "value": "A picture."}]})
        s.image_bytes = [png(i)]
        out.append(s)
    return out
