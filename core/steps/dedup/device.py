"""Device choice and float32 precision for the dedup kernels (k-means, pairwise similarity)."""

from __future__ import annotations

from contextlib import contextmanager


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a GPU, else `cpu`; `cuda` without a GPU is an error. `cpu` is answered
    without importing torch (~2 s of CPU in a fresh worker process)."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no GPU")
    return device



@contextmanager
def _fp32_highest():
    """Full float32 matmuls (no TF32 on GPU) so GPU and CPU decide alike; restored afterwards."""
    import torch

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)
