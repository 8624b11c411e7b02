"""The embedded default scoring model: a tiny LM trained on reference ("clean") conversations.

DFN-style: the filter model learns what good data looks like from a trusted subset, then perplexity
under it ranks the rest. For the demo the trusted subset is the demo's clean samples (ground_truth.json
"clean"), ideally from another seed so that the scored samples were never seen in training.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from core.foundation.ids import load_id_list  # noqa: F401  (the one id-list loader; re-exported for old imports)
from core.foundation.sample import Sample, strip_image_placeholders
from core.models.tiny_lm import ensure_tiny_lm
from core.steps.perplexity.encode import ROLE_MAP

log = logging.getLogger(__name__)


def reference_texts(samples: Iterable[Sample]) -> list[Any]:
    """Training texts for the tiny LM: each sample as chat messages (assistant_only mode sees these,
    placeholders kept) and as plain text with placeholders stripped (what `text` mode scores)."""
    out: list[Any] = []
    for s in samples:
        out.append([{"role": ROLE_MAP[t.role], "content": t.value} for t in s.conversations])
        out.append("\n".join(p for p in (strip_image_placeholders(t.value) for t in s.conversations) if p))
    return out


NO_MODEL = "NO_MODEL.json"  # marker of a reference LM that had no samples to learn from


def train_reference_lm(shards: Sequence[str], out_dir: str | os.PathLike, ids: Iterable[str] | None = None,
                       **params: Any) -> str:
    """Train (or reuse, see `ensure_tiny_lm`) the tiny LM on the samples `ids` of `shards` (all when None).

    `params` go to `core.models.tiny_lm.train_tiny_lm` (steps, vocab_size, seed, hidden, ...).
    """
    from core.io.wds import iter_samples

    want = set(ids) if ids is not None else None
    samples = list(iter_samples(shards, include_ids=want, load_images=False, verify_images=False))
    if not samples:
        # A degenerate run (empty source, every sample quarantined) has nothing to train on and nothing to
        # score: leave a marker instead of failing; scoring real samples with it raises (the user must act).
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, NO_MODEL), "w") as f:
            json.dump({"reason": "no reference samples (the reference set is empty or entirely quarantined)"}, f)
        log.warning("reference LM: no reference samples; no model trained")
        return str(out_dir)
    return ensure_tiny_lm(out_dir, reference_texts(samples), **params)
