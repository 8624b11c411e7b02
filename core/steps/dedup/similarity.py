"""M_j = max cosine similarity of j to any earlier member of its cluster's keep order, three ways with the same
result: chunked (`max_earlier_similarity`, O(chunk^2) memory for big clusters), batched (many small
clusters in one padded product) and dense (the paper's full matrix; the reference). The winning pair is
recomputed in float64 (`_exact_m`) so M does not depend on the blocking."""

from __future__ import annotations

import math

import numpy as np

from core.steps.dedup.device import _fp32_highest


def max_earlier_similarity(
    x: np.ndarray, chunk_size: int = 4096, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """M_j = max_{i<j} <x_i, x_j> and its argmax i (-1 for j=0), for rows `x` in keep order.

    Only upper-triangle blocks of chunk_size x chunk_size are formed, and a running max is kept per
    column block, so extra memory is O(chunk_size^2) whatever the cluster size (a 50k cluster never
    materializes 50k x 50k). Exact float32 products (TF32 is disabled on GPU).
    """
    import torch

    n = x.shape[0]
    a_out = np.full(n, -1, np.int64)
    if n < 2:
        return np.full(n, -np.inf, np.float32), a_out
    b = max(1, int(chunk_size))
    with torch.inference_mode():
        with _fp32_highest():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
            tri = None
            for c0 in range(0, n, b):
                c1 = min(n, c0 + b)
                cols = xt[c0:c1]
                best = torch.full((c1 - c0,), -math.inf, device=xt.device)
                barg = torch.full((c1 - c0,), -1, dtype=torch.int64, device=xt.device)
                for r0 in range(0, c1, b):
                    r1 = min(c1, r0 + b)
                    s = xt[r0:r1] @ cols.T
                    if r0 == c0:  # diagonal block: keep only i < j
                        if tri is None or tri.shape != s.shape:
                            tri = torch.ones(s.shape, dtype=torch.bool, device=xt.device).tril_()
                        s.masked_fill_(tri, -math.inf)
                    v, a = s.max(dim=0)
                    upd = v > best  # strict: on ties the earliest row block wins (argmax = first)
                    best = torch.where(upd, v, best)
                    barg = torch.where(upd, a + r0, barg)
                a_out[c0:c1] = barg.cpu().numpy()
    return _exact_m(x, a_out), a_out


def batched_max_earlier_similarity(
    x: np.ndarray, positions: list[np.ndarray], device: str = "cpu"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`max_earlier_similarity` for many small clusters (rows `x[pos]`, in keep order) at once.

    Thousands of ~100-member clusters would otherwise cost a few kernel launches each; here a batch
    of B clusters padded to the largest size n costs one (B, n, n) product. Padding rows are masked.
    """
    import torch

    if not positions:
        return []
    nmax = max(len(p) for p in positions)
    pad = np.zeros((len(positions), nmax, x.shape[1]), np.float32)
    lens = np.array([len(p) for p in positions])
    for b, p in enumerate(positions):
        pad[b, : len(p)] = x[p]
    with torch.inference_mode(), _fp32_highest():
        xt = torch.from_numpy(pad).to(device)
        s = torch.bmm(xt, xt.transpose(1, 2))  # (B, rows i, cols j)
        i = torch.arange(nmax, device=xt.device)
        invalid = (i[:, None] >= i[None, :])[None] | (i[None, :, None] >= torch.as_tensor(lens, device=xt.device)[:, None, None])
        s.masked_fill_(invalid, -math.inf)
        v, a = s.max(dim=1)
        a = a.cpu().numpy()
    out = []
    for b, p in enumerate(positions):
        ab = a[b, : len(p)].astype(np.int64)
        ab[0] = -1
        out.append((_exact_m(pad[b, : len(p)], ab), ab))
    return out


def _exact_m(x: np.ndarray, argmax: np.ndarray) -> np.ndarray:
    """M recomputed in float64 for the chosen neighbour, clipped to [-1, 1], as float32.

    A float32 GEMM entry depends (by ~1e-7) on the BLAS kernel chosen for the block shape, so two
    correct blockings can disagree on M near a threshold. Recomputing the winning pair exactly makes
    M independent of blocking unless two neighbours tie within float32 rounding (exact copies tie
    exactly, so they still agree).
    """
    m = np.full(len(argmax), -np.inf, np.float32)
    j_all = np.flatnonzero(argmax >= 0)
    for s in range(0, len(j_all), 4096):  # blockwise: float64 copies of a 50k cluster would be 600 MB
        j = j_all[s : s + 4096]
        dots = np.einsum("ij,ij->i", x[argmax[j]].astype(np.float64), x[j].astype(np.float64))
        m[j] = np.clip(dots, -1.0, 1.0).astype(np.float32)
    return m


def dense_max_earlier_similarity(x: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Reference: the full n x n similarity matrix at once, as the paper's code does. O(n^2) memory."""
    import torch

    n = x.shape[0]
    a_out = np.full(n, -1, np.int64)
    if n < 2:
        return np.full(n, -np.inf, np.float32), a_out
    with torch.inference_mode(), _fp32_highest():
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        s = xt @ xt.T
        # mask i >= j strip by strip so the reference's memory is the n x n matrix itself, not 1.25x
        strip = 1024
        for r0 in range(0, n, strip):
            r1 = min(n, r0 + strip)
            rows = torch.arange(r0, r1, device=xt.device)[:, None]
            s[r0:r1].masked_fill_(rows >= torch.arange(n, device=xt.device)[None, :], -math.inf)
        v, a = s.max(dim=0)
        del s
    a_out[1:] = a.cpu().numpy()[1:]
    return _exact_m(x, a_out), a_out
