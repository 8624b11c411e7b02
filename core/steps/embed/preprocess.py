"""The model's own image preprocessing, split into a per-image PIL stage and a per-batch tensor stage.

open_clip's eval preprocessing is a torchvision `Compose`: PIL transforms (Resize, CenterCrop, convert
to RGB), then `ToTensor` (uint8 HWC -> float CHW / 255) and `Normalize` ((x - mean) / std). Run per
image, the tensor part costs far more in Python and small-tensor torch calls than the arithmetic does.
`BatchPreprocess` keeps the PIL stage per image (in the decode threads; the image leaves it as a uint8
HWC array) and runs the tensor stage once per batch with the same torch operations in the same order.
Every operation is elementwise (uint8 -> float conversion, true division, subtraction, division), so
the batch is bit-identical to stacking the per-image outputs of the `Compose` (tests/unit/test_embed.py
checks this for the tiny model, ViT-B-16 and SigLIP-style squash resizing over many image sizes).

Anything it does not recognise (other transforms after `ToTensor`, non-RGB images after the PIL stage)
falls back to the `Compose` itself, so the output never depends on which path ran.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class BatchPreprocess:
    """`preprocess` (a torchvision Compose) as `image(pil) -> item` per image plus `batch(items) -> tensor`.

    Build with `BatchPreprocess.split(preprocess)`, which returns None when the Compose does not have the
    PIL-transforms + ToTensor [+ Normalize] shape; then use the Compose per image as before.
    """

    def __init__(self, preprocess: Any, pil_stage: list[Any], normalize: Any | None):
        import torch

        self.preprocess = preprocess
        self._pil = [_fast_pil_transform(t) for t in pil_stage]
        self._dtype = torch.get_default_dtype()
        self._mean = self._std = None
        if normalize is not None:
            mean = torch.as_tensor(normalize.mean, dtype=self._dtype)
            std = torch.as_tensor(normalize.std, dtype=self._dtype)
            self._mean = mean.view(-1, 1, 1) if mean.ndim == 1 else mean
            self._std = std.view(-1, 1, 1) if std.ndim == 1 else std

    @classmethod
    def split(cls, preprocess: Any) -> BatchPreprocess | None:
        """A BatchPreprocess for a Compose of PIL transforms, ToTensor and an optional final Normalize;
        None for any other shape (the caller keeps using `preprocess` per image)."""
        from torchvision.transforms import Normalize, ToTensor

        transforms = list(getattr(preprocess, "transforms", None) or [])
        idx = [i for i, t in enumerate(transforms) if isinstance(t, ToTensor)]
        if len(idx) != 1:
            return None
        pil_stage, rest = transforms[: idx[0]], transforms[idx[0] + 1 :]
        if any(isinstance(t, Normalize) for t in pil_stage):
            return None
        if not rest:
            return cls(preprocess, pil_stage, None)
        if len(rest) != 1 or type(rest[0]) is not Normalize:
            return None
        norm = rest[0]
        import torch

        if bool((torch.as_tensor(norm.std, dtype=torch.get_default_dtype()) == 0).any()):
            return None  # torchvision raises per image; keep that behaviour (the Compose path)
        return cls(preprocess, pil_stage, norm)

    def image(self, im: Any) -> Any:
        """PIL image -> the PIL stage's output as a uint8 (H, W, 3) array (RGB), or, for images that leave
        the PIL stage in another mode, the Compose's own float tensor (C, H, W)."""
        for t in self._pil:
            im = t(im)
        if getattr(im, "mode", None) != "RGB":
            return self.preprocess(im)  # rare (our decoder always gives RGB): the reference path, per image
        return np.asarray(im)

    def batch(self, items: list[Any]) -> Any:
        """Items of `image()` -> the float batch (N, C, H, W), contiguous, equal to
        `torch.stack([preprocess(im) for im in images])`."""
        import torch

        if all(isinstance(x, np.ndarray) for x in items):
            return self._tensor_stage(np.stack(items))
        return torch.stack([x if isinstance(x, torch.Tensor) else self._tensor_stage(np.stack([x]))[0] for x in items])

    def _tensor_stage(self, u8: np.ndarray) -> Any:
        """(N, H, W, 3) uint8 -> what ToTensor + Normalize give per image, for all N at once."""
        import torch

        # ToTensor: HWC -> CHW contiguous, .to(default float dtype).div(255)
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous().to(dtype=self._dtype).div(255)
        if self._mean is not None:  # Normalize: tensor.sub_(mean).div_(std), mean/std shaped (C, 1, 1)
            x = x.sub_(self._mean).div_(self._std)
        return x


def _fast_pil_transform(t: Any) -> Any:
    """The same PIL transform without torchvision's per-call checks where that is exact: Resize computes
    torchvision's output size and calls PIL's resize (as torchvision does), no-op crops/conversions are
    skipped (they only copy). Other transforms are returned unchanged."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize
    from torchvision.transforms import functional as F

    compute = getattr(F, "_compute_resized_output_size", None)
    if (type(t) is Resize and compute is not None and isinstance(t.interpolation, InterpolationMode)
            and t.max_size is None):
        size = [t.size] if isinstance(t.size, int) else list(t.size)
        pil_mode = F.pil_modes_mapping[t.interpolation]
        cache: dict[tuple[int, int], tuple[int, int] | None] = {}

        def resize(im: Any) -> Any:
            if not hasattr(im, "resize") or not hasattr(im, "mode"):
                return t(im)
            w, h = im.size
            out = cache.get((w, h), False)
            if out is False:
                nh, nw = compute((h, w), size, t.max_size)
                out = cache[(w, h)] = None if (nh, nw) == (h, w) else (nw, nh)
            return im if out is None else im.resize(out, pil_mode)

        return resize
    if type(t) is CenterCrop:
        ch, cw = t.size

        def crop(im: Any) -> Any:
            return im if getattr(im, "size", None) == (cw, ch) and hasattr(im, "crop") else t(im)

        return crop
    if getattr(t, "mode", None) == "RGB" and type(t).__name__ == "MaybeConvertMode":
        return lambda im: im if getattr(im, "mode", None) == "RGB" else t(im)
    return t
