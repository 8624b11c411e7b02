"""open_clip model loading (once per process) and the image/text embedders.

`SigLIP2ImageEmbedder` and `SigLIP2TextEmbedder` are plain classes: usable in-process, and wrapped with
`ray.remote(num_gpus=cfg.num_gpus)` at run time so that each Ray actor builds the model once in
`__init__` and then serves batches. Both share one loaded model per process (`load_model` is cached),
so an actor holding both embedders holds one copy of the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.steps.embed.config import TINY_MODEL_NAME, EmbedConfig

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_LOCK = threading.Lock()
_MODELS: dict[tuple, LoadedModel] = {}


@dataclass
class LoadedModel:
    """One open_clip model ready for inference, with its own preprocessing and tokenizer."""

    model: Any
    preprocess: Any  # PIL.Image -> float tensor (C, H, W)
    tokenizer: Any  # list[str] -> LongTensor (N, context_length)
    device: Any  # torch.device
    autocast_dtype: Any  # torch.bfloat16 on CUDA in a bf16 mode, else None
    model_name: str

    def autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 0) or 0)


def register_tiny_model() -> None:
    """Register this package's model configs (idempotent) so `mmcurate-tiny-vit` is an open_clip name."""
    import open_clip

    if TINY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def resolve_device(device: str):
    """`auto` -> cuda when available else cpu; `cuda` without a GPU is an error, never a silent CPU run."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no GPU in this process (check num_gpus / CUDA_VISIBLE_DEVICES)")
    return torch.device(device)


def default_cache_dir(cfg: EmbedConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("MMCURATE_CACHE", Path.home() / ".cache" / "mmcurate"))


def _fetch(url: str, dest: Path) -> Path:
    """Copy a file or folder from an fsspec URL into `dest` once (atomic rename), return the local path."""
    import fsspec

    if dest.exists():
        return dest
    fs, path = fsspec.core.url_to_fs(url)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
    else:
        fs.get(path, str(tmp))
    try:
        os.replace(tmp, dest)
    except OSError:  # another actor on this node won the race with identical content
        if not dest.exists():
            raise
    return dest


def resolve_weights(cfg: EmbedConfig) -> tuple[str, str | None]:
    """Turn remote (fsspec) model locations into local ones; returns (open_clip model_name, pretrained)."""
    cache = default_cache_dir(cfg)
    name, pretrained = cfg.model_name, cfg.pretrained
    if name.startswith("local-dir:") and "://" in name:
        url = name[len("local-dir:") :]
        name = "local-dir:" + str(_fetch(url, cache / "remote" / hashlib.sha1(url.encode()).hexdigest()[:16]))
    if pretrained and "://" in pretrained:
        local = cache / "remote" / hashlib.sha1(pretrained.encode()).hexdigest()[:16] / Path(pretrained).name
        pretrained = str(_fetch(pretrained, local))
    if name == TINY_MODEL_NAME and pretrained is None:
        pretrained = str(tiny_checkpoint(cache, cfg.seed))
    elif name == TINY_MODEL_NAME and pretrained == RANDOM_INIT:
        pretrained = str(random_tiny_checkpoint(cache, cfg.seed))
    return name, pretrained


RANDOM_INIT = "random-init"  # `pretrained` value selecting the tiny model's untrained weights (baselines)


def tiny_checkpoint(cache_dir: Path, seed: int = 0) -> Path:
    """The tiny model's weights (safetensors): trained contrastively on the demo generator's image/caption
    pairs from a seeded init (`core.steps.embed.tiny_train`), once per machine, then copied into `cache_dir`."""
    from core.steps.embed.tiny_train import ensure_tiny_vit

    return ensure_tiny_vit(cache_dir, seed)


def random_tiny_checkpoint(cache_dir: Path, seed: int = 0) -> Path:
    """The tiny model's untrained weights: random init with `seed` (safetensors), the baseline the trained
    model is compared against."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = Path(cache_dir) / f"{TINY_MODEL_NAME}-random-seed{seed}.safetensors"
    if path.exists():
        return path
    register_tiny_model()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL_NAME, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_model(cfg: EmbedConfig) -> LoadedModel:
    """Build (once per process and model key) the open_clip model, its preprocess and its tokenizer."""
    key = cfg.model_key()
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
        import open_clip
        import torch

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from a local cache, never the network
        register_tiny_model()
        device = resolve_device(cfg.device)
        name, pretrained = resolve_weights(cfg)
        on_gpu = device.type == "cuda"
        oc_precision = "bf16" if (on_gpu and cfg.precision == "bf16") else "fp32"
        torch.manual_seed(cfg.seed)  # pretrained=None models (benchmarks) get reproducible random weights
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=oc_precision, device=device, cache_dir=cfg.cache_dir
        )
        model.eval()
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cfg.cache_dir)
        lm = LoadedModel(
            model=model,
            preprocess=preprocess,
            tokenizer=tokenizer,
            device=device,
            autocast_dtype=torch.bfloat16 if on_gpu and cfg.precision in ("amp_bf16", "bf16") else None,
            model_name=name,
        )
        log.info("loaded %s (pretrained=%s) on %s, precision %s", name, pretrained, device, cfg.precision)
        _MODELS[key] = lm
        return lm


def _normalize(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """float32 L2-normalised rows and the raw norms (a norm of 0 stays a zero vector)."""
    x = feats.float().cpu().numpy()
    norms = np.linalg.norm(x, axis=1)
    out = x / np.maximum(norms, 1e-12)[:, None]
    return out.astype(np.float32), norms.astype(np.float32)


class SigLIP2ImageEmbedder:
    """Image tower of an open_clip model (SigLIP2 by default): PIL images -> L2-normalised vectors.

    Build it once per worker; `preprocess` is CPU-only and thread-safe, `embed_pixels` runs the model.
    """

    def __init__(self, cfg: EmbedConfig):
        self.cfg = cfg
        self.lm = load_model(cfg)

    def preprocess(self, image: Any) -> Any:
        """PIL RGB image -> float tensor (C, H, W) with the model's own resize/crop/normalisation."""
        return self.lm.preprocess(image)

    def embed_pixels(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        """A preprocessed batch (N, C, H, W) -> (normalised float32 (N, D), raw norms (N,))."""
        import torch

        lm = self.lm
        with torch.inference_mode(), lm.autocast():
            x = pixels.to(lm.device, non_blocking=True)
            feats = lm.model.encode_image(x, normalize=False)
        return _normalize(feats)

    def embed_images(self, images: list[Any]) -> np.ndarray:
        """PIL images -> normalised float32 (N, D), in batches of cfg.batch_size."""
        import torch

        out = []
        for i in range(0, len(images), self.cfg.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + self.cfg.batch_size]])
            out.append(self.embed_pixels(batch)[0])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class SigLIP2TextEmbedder:
    """Text tower of an open_clip model: strings -> L2-normalised vectors, tokenized with the model's own
    tokenizer and context length (longer texts are truncated by the tokenizer)."""

    def __init__(self, cfg: EmbedConfig):
        self.cfg = cfg
        self.lm = load_model(cfg)

    def tokenize(self, texts: list[str]) -> Any:
        return self.lm.tokenizer(list(texts))

    def embed_tokens(self, tokens: Any) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (N, L) -> (normalised float32 (N, D), raw norms (N,))."""
        import torch

        lm = self.lm
        with torch.inference_mode(), lm.autocast():
            feats = lm.model.encode_text(tokens.to(lm.device, non_blocking=True), normalize=False)
        return _normalize(feats)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> normalised float32 (N, D), in batches of cfg.batch_size."""
        out = []
        for i in range(0, len(texts), self.cfg.batch_size):
            out.append(self.embed_tokens(self.tokenize(texts[i : i + self.cfg.batch_size]))[0])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def as_ray_actor(cls: type, cfg: EmbedConfig, **options: Any) -> Any:
    """Start `cls` (an embedder or ShardEmbedWorker) as a Ray actor that reserves `cfg.num_gpus` GPUs and
    `cfg.cpus_per_actor` CPUs; it builds its model once in `__init__`. Ray must be initialised."""
    import ray

    return ray.remote(num_gpus=cfg.num_gpus, num_cpus=cfg.cpus_per_actor)(cls).options(**options).remote(cfg)


def tiny_local_dir(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """The tiny model as an open_clip `local-dir` (open_clip_config.json + open_clip_model.safetensors).

    Same trained weights as `tiny_checkpoint`, so the trainer's frozen vision tower is the embedder's model.
    Workers that load a local-dir need no `add_model_config` registration.
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = tiny_checkpoint(out / ".cache", seed)
    model_cfg = json.loads((_CONFIG_DIR / f"{TINY_MODEL_NAME}.json").read_text())
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    shutil.copyfile(weights, out / "open_clip_model.safetensors")
    shutil.rmtree(out / ".cache", ignore_errors=True)
    return str(out)
