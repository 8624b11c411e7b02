"""Test doubles for the eval runner (tests only): deterministic backends that answer from the fixtures'
ground truth, echo, or fail on purpose."""

from __future__ import annotations

import hashlib
import os
import threading

from core.evals.backends import GenRequest
from core.evals.base import EvalItem, get_benchmark


def image_key(images) -> str:
    h = hashlib.sha1()
    for im in images:
        h.update(im.convert("RGB").tobytes())
    return h.hexdigest()


def ideal_answer(bench: str, item: EvalItem) -> str:
    """What a perfect model would reply, in the format each prompt asks for."""
    t = item.target
    if bench == "countbench":
        return str(t)
    if bench == "docvqa":
        return t[0]
    if bench in ("chartqa", "realworldqa"):
        return str(t)
    if bench == "pixmo_points":
        import io

        from PIL import Image

        w, h = Image.open(io.BytesIO(item.images[0])).size
        pts = t["points"]
        if not pts:
            return "There are none."
        return " ".join(f'<point x="{p[0] / w * 100:.2f}" y="{p[1] / h * 100:.2f}">' for p in pts)
    raise KeyError(bench)


def oracle_table(cache_dir: str, benches: list[str]) -> dict[tuple[str, str], str]:
    """(prompt, image hash) -> ideal answer for every loadable, decodable fixture item."""
    from core.evals.runner import _decode

    table = {}
    for name in benches:
        b = get_benchmark(name)
        for item in b.load(os.path.join(cache_dir, name)):
            if not isinstance(item, EvalItem):
                continue
            try:
                images = _decode(item)
            except Exception:
                continue
            table[(b.prompt(item), image_key(images))] = ideal_answer(name, item)
    return table


class OracleBackend:
    """Answers from the ground-truth table; replies `wrong` for checkpoints whose dir contains WRONG, and
    raises for prompts containing `fail_on`."""

    def __init__(self, table, checkpoint_dir: str, fail_on: str = ""):
        self.table = table
        self.wrong = os.path.exists(os.path.join(checkpoint_dir, "WRONG"))
        self.fail_on = fail_on
        self.calls = 0
        self.lock = threading.Lock()

    def generate(self, requests: list[GenRequest]) -> list[str]:
        with self.lock:
            self.calls += 1
        out = []
        for r in requests:
            if self.fail_on and self.fail_on in r.prompt:
                raise RuntimeError("planted generation failure")
            out.append("I cannot tell" if self.wrong else self.table[(r.prompt, image_key(r.images))])
        return out

    def close(self) -> None:
        pass
