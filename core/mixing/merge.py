"""Soups: merge checkpoints of one architecture by averaging their safetensors tensors by name.

Generic over checkpoint folders: every `*.safetensors` file (at any depth, e.g. the built-in trainer's
`projector.safetensors` and `lm/model.safetensors`, or a Hugging Face `model.safetensors`) is merged tensor by
tensor; every other file (configs, tokenizer, markers) is copied from the first expert, so a soup folder has
the layout of an expert and loads with the same code. Optimizer and trainer state are not copied.

Methods (`w` = the subset's weights):
- `uniform`:  mean of the experts (w_k = 1/n).
- `weighted`: sum_k w_k theta_k with w normalised to sum to one.
- `task_arithmetic`: base + sum_k w_k (theta_k - base); w is used as given (`scale` multiplies it);
  with w_k = 1/n this equals the uniform soup.

Tensors identical in every expert (and the base) are copied from the first expert, not recomputed: the frozen
vision tower is shared, never averaged, so it stays bit-identical. Experts are read one at a time into a float64
accumulator (`SoupBuilder.add`), so a worker holds one downloaded expert plus the soup, never the whole subset.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METHODS = ("uniform", "weighted", "task_arithmetic")
SKIP_FILES = {"optimizer.pt", "trainer_state.json"}  # training state of an expert, meaningless for a soup
SOUP_FILE = "soup.json"


def normalize_weights(n: int, method: str, weights: Sequence[float] | None = None, scale: float = 1.0) -> list[float]:
    """The weights applied to `n` experts: uniform 1/n; weighted normalised to sum 1 (non-negative, not all
    zero); task arithmetic as given (default 1/n) times `scale`."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} not in {METHODS}")
    if n < 1:
        raise ValueError("a soup needs at least one expert")
    if weights is not None and len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} experts")
    if method == "uniform" or weights is None and method == "weighted":
        return [1.0 / n] * n
    w = [float(x) for x in weights] if weights is not None else [1.0 / n] * n
    if method == "weighted":
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"weighted soup needs non-negative weights with a positive sum, got {w}")
        s = sum(w)
        return [x / s for x in w]
    return [x * scale for x in w]


def tensor_files(ckpt: str | os.PathLike) -> list[str]:
    """Relative paths of the `*.safetensors` files of a checkpoint folder, sorted."""
    root = Path(ckpt)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors"))


class SoupBuilder:
    """Streaming merge: `add(expert_dir, weight)` one expert at a time, then `finish(out_dir)`.

    Accumulates in float64 (the result is cast back to each tensor's dtype). For task arithmetic pass the base
    checkpoint: the soup is base + sum_k w_k (theta_k - base) = (1 - sum w) base + sum_k w_k theta_k.
    """

    def __init__(self, method: str = "uniform", base: str | os.PathLike | None = None):
        if method not in METHODS:
            raise ValueError(f"method {method!r} not in {METHODS}")
        if method == "task_arithmetic" and base is None:
            raise ValueError("task_arithmetic needs the base checkpoint")
        self.method = method
        self.base = str(base) if base is not None else None
        self.files: list[str] | None = None
        self.acc: dict[str, dict[str, Any]] = {}  # file -> name -> float64 sum (None while all equal so far)
        self.first: dict[str, dict[str, Any]] = {}  # file -> name -> first expert's tensor
        self.same: dict[str, dict[str, bool]] = {}  # file -> name -> identical in every checkpoint seen
        self.template: str | None = None  # first expert's folder (copied for the non-tensor files)
        self.weights: list[float] = []
        self.n_added = 0

    def add(self, expert_dir: str | os.PathLike, weight: float) -> None:
        """Add one expert's tensors times `weight`; the folder may be deleted right after this returns."""
        import torch
        from safetensors.torch import load_file

        files = tensor_files(expert_dir)
        if not files:
            raise ValueError(f"{expert_dir} has no *.safetensors files")
        if self.files is None:
            self.files = files
        elif files != self.files:
            raise ValueError(f"{expert_dir} has tensor files {files}, expected {self.files}")
        for f in files:
            sd = load_file(os.path.join(expert_dir, f))
            if f not in self.first:
                self.first[f] = sd
                self.same[f] = {k: True for k in sd}
                self.acc[f] = {}
                for k, v in sd.items():
                    if v.is_floating_point():
                        self.acc[f][k] = v.double() * weight
                continue
            first, same, acc = self.first[f], self.same[f], self.acc[f]
            if set(sd) != set(first):
                raise ValueError(f"{expert_dir}/{f}: tensor names differ from the first expert's")
            for k, v in sd.items():
                if v.shape != first[k].shape:
                    raise ValueError(f"{expert_dir}/{f}:{k} has shape {tuple(v.shape)}, expected {tuple(first[k].shape)}")
                if same[k] and not torch.equal(v, first[k]):
                    same[k] = False
                if k in acc:
                    acc[k] += v.double() * weight
            del sd
        if self.template is None:
            self.template = self._keep_template(expert_dir)
        self.weights.append(float(weight))
        self.n_added += 1

    def _keep_template(self, expert_dir: str | os.PathLike) -> str:
        """Copy the first expert's non-tensor files aside (the caller may delete the expert folder)."""
        import tempfile

        tmp = tempfile.mkdtemp(prefix="soup-template-")
        root = Path(expert_dir)
        for p in root.rglob("*"):
            rel = p.relative_to(root)
            if p.is_file() and p.suffix != ".safetensors" and rel.as_posix() not in SKIP_FILES:
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, Path(tmp) / rel)
        return tmp

    def finish(self, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the soup folder (same layout as an expert); returns stats (tensors merged / shared)."""
        import torch
        from safetensors.torch import load_file, save_file

        if self.n_added == 0 or self.files is None or self.template is None:
            raise ValueError("no expert added")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.template, out, dirs_exist_ok=True)
        shutil.rmtree(self.template, ignore_errors=True)
        base_coef = 1.0 - sum(self.weights) if self.method == "task_arithmetic" else 0.0
        merged = shared = 0
        for f in self.files:
            base_sd = load_file(os.path.join(self.base, f)) if self.base is not None else None
            res = {}
            for k, v in self.first[f].items():
                same = self.same[f][k] and (base_sd is None or torch.equal(base_sd[k], v))
                if same or k not in self.acc[f]:  # frozen (vision tower) or integer buffers: copied, not averaged
                    res[k] = v
                    shared += 1
                    continue
                t = self.acc[f][k]
                if base_coef != 0.0:
                    t = t + base_sd[k].double() * base_coef
                res[k] = t.to(v.dtype).contiguous()
                merged += 1
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            meta_st = {"format": "pt"}
            save_file(res, str(out / f), metadata=meta_st)
        info = {"method": self.method, "weights": self.weights, "n_experts": self.n_added,
                "tensors_merged": merged, "tensors_shared": shared, **(meta or {})}
        (out / SOUP_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
        self.first.clear()
        self.acc.clear()
        return info


def merge_checkpoints(experts: Sequence[str | os.PathLike], out_dir: str | os.PathLike, method: str = "uniform",
                      weights: Sequence[float] | None = None, base: str | os.PathLike | None = None,
                      scale: float = 1.0) -> dict[str, Any]:
    """Merge expert checkpoint folders into `out_dir` (see the module docstring for the methods)."""
    w = normalize_weights(len(experts), method, weights, scale)
    b = SoupBuilder(method, base)
    for e, wi in zip(experts, w):
        b.add(e, wi)
    return b.finish(out_dir)
