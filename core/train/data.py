"""Training data: random access into WDS shards, ChatML tokenization with assistant-only labels.

The index is built once from the tar headers (member offsets), so any sample can be read with one
seek. That is what makes the data order a pure function of (seed, epoch) and lets a resumed run skip
exactly the batches it already trained on.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.foundation.fingerprint import files_fingerprint

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")


@dataclass
class Entry:
    """One sample's location: the shard and (offset, size) of each member by suffix (`json`, `jpg`, `0.png`)."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def list_tar_shards(data: str | Sequence[str]) -> list[str]:
    """The shards to train on: an export's manifest list, else the sorted `*.tar` of a directory, or the given
    list of shard paths.

    An export folder (`manifest.json` + `shards/`), or its `shards/` folder, is read through the manifest: only
    the shards it names, in its order, and every one must exist. Tars beside them that the manifest does not
    name (left by an earlier, larger export into the same folder) are never trained on.
    """
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            listed = manifest_shards(p)
            if listed is not None:
                return listed
            return sorted(str(x) for x in p.glob("*.tar"))
        return [str(p)]
    return [str(x) for x in data]


def _export_manifest(p: Path) -> tuple[dict[str, Any], Path] | None:
    """(manifest, shards folder) of an export folder or of its `shards/` folder; None for a plain folder."""
    from core.io.wds.reader import export_manifest  # here, not at the top: it pulls in the image stack

    for export_dir, shard_dir in ((p, p / "shards"), (p.parent, p)):
        if shard_dir.name == "shards" and shard_dir.is_dir():
            m = export_manifest(str(export_dir))  # ingest's shards/manifest.json lists paths and is not one
            if m is not None:
                return m, shard_dir
    return None


def manifest_shards(p: str | os.PathLike) -> list[str] | None:
    """Shard paths listed by the export manifest of `p` (see `list_tar_shards`), or None when there is none.
    The list and its name checks are `core.io.wds.export_shards`'; here every listed shard must also exist, and tars
    the manifest does not name are reported and ignored."""
    found = _export_manifest(Path(p))
    if found is None:
        return None
    from core.io.wds.reader import export_shards

    m, shard_dir = found
    out = export_shards(str(shard_dir.parent), m)
    for f in out:
        if not Path(f).is_file():
            raise ValueError(f"{shard_dir}: shard {Path(f).relative_to(shard_dir).as_posix()} listed in the manifest "
                             "is missing")
    listed = {Path(x).relative_to(shard_dir).as_posix() for x in out}
    stale = sorted({x.relative_to(shard_dir).as_posix() for x in shard_dir.glob("**/*.tar")} - listed)
    if stale:
        log.warning("%s: %d tar file(s) not in the manifest are ignored: %s", shard_dir, len(stale), stale[:5])
    return out


def data_fingerprint(shards: Sequence[str]) -> str:
    """Identity of the training data: each shard's name and size, in order, plus its sha256 when an export
    manifest records one (cheap: no shard is read)."""
    digests: dict[str, str] = {}
    # an export's shards sit in shards/ (format 1) or shards/<kind>/ (format 2): look one level up too
    for d in {str(q) for s in shards for q in (Path(s).parent, Path(s).parent.parent)}:
        found = _export_manifest(Path(d))
        if found is not None:
            digests.update({str(found[1] / s["name"]): str(s.get("sha256", "")) for s in found[0]["shards"]})
    return files_fingerprint((Path(s).name, os.path.getsize(s), digests.get(s, "")) for s in shards)


def build_index(shards: Sequence[str]) -> list[Entry]:
    """Scan tar headers (no payload reads) and group members by WDS key (name up to the first dot)."""
    entries: list[Entry] = []
    for shard in shards:
        by_key: dict[str, Entry] = {}
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, _, suffix = base.partition(".")
                e = by_key.get(key)
                if e is None:
                    e = by_key[key] = Entry(shard, key)
                    entries.append(e)
                e.members[suffix] = (m.offset_data, m.size)
        for e in by_key.values():
            if "json" not in e.members:
                raise ValueError(f"{shard}: sample {e.key!r} has no .json member (not a training-schema shard)")
    return entries


def read_entry(e: Entry) -> tuple[dict[str, Any], list[bytes]]:
    """The LLaVA record and its encoded images (in record order) of one indexed sample."""
    with open(e.shard, "rb") as f:
        def read(suffix: str) -> bytes:
            off, size = e.members[suffix]
            f.seek(off)
            return f.read(size)

        record = json.loads(read("json"))
        names = record.get("image")
        n = 0 if names is None else (1 if isinstance(names, str) else len(names))
        images: list[bytes] = []
        for i in range(n):
            suffix = _image_suffix(e, i if n > 1 else None)
            images.append(read(suffix))
    return record, images


def _image_suffix(e: Entry, i: int | None) -> str:
    for ext in IMAGE_EXTS:
        s = ext if i is None else f"{i}.{ext}"
        if s in e.members:
            return s
    raise ValueError(f"{e.shard}: sample {e.key!r} lacks image member {'' if i is None else i}")


def split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out `val_size` indices once, by seed; both parts sorted so epochs permute a fixed list."""
    if val_size >= n:
        raise ValueError(f"val_size {val_size} leaves no training data out of {n} samples")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def epoch_order(train_idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The epoch's sample order: a permutation that depends only on (seed, epoch)."""
    return train_idx[np.random.default_rng([seed, epoch]).permutation(len(train_idx))]


def rank_batches(order: np.ndarray, batch_size: int, world: int, rank: int) -> list[np.ndarray]:
    """Per-step index batches of one rank (the trailing partial global batch is dropped)."""
    gb = batch_size * world
    steps = len(order) // gb
    return [order[s * gb + rank * batch_size: s * gb + (rank + 1) * batch_size] for s in range(steps)]


# ---- tokenization -------------------------------------------------------------------------------
def chatml_segments(turns: list[dict[str, str]], image_token: str, n_image_tokens: int) -> list[tuple[str, bool]]:
    """(text, trainable) pieces of a ChatML rendering; assistant answers and their end tag are trainable.

    Each `<image>` placeholder is repeated `n_image_tokens` times: one slot per projected patch.
    """
    segs: list[tuple[str, bool]] = []
    for t in turns:
        role = ROLE_NAMES[t["from"]]
        value = t["value"].replace(image_token, image_token * n_image_tokens)
        if role == "assistant":
            segs.append(("<|im_start|>assistant\n", False))
            segs.append((value + "<|im_end|>", True))
            segs.append(("\n", False))
        else:
            segs.append((f"<|im_start|>{role}\n{value}<|im_end|>\n", False))
    return segs


def encode_conversation(
    tokenizer: Any, turns: list[dict[str, str]], image_token_id: int, n_image_tokens: int, max_len: int
) -> tuple[list[int], list[int], int]:
    """Token ids and labels (-100 on non-assistant and image tokens) plus how many images survive truncation.

    Truncation never splits an image: it cuts before the first incomplete image block. Segments past
    `max_len` are not tokenized at all, so a conversation of 40,000 turns costs what its first `max_len`
    tokens cost (each segment is tokenized on its own, so the cut does not change the kept ids).
    """
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in chatml_segments(turns, image_token, n_image_tokens):
        if len(ids) >= max_len:
            break
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trainable else [IGNORE_INDEX] * len(piece))
    ids, labels = ids[:max_len], labels[:max_len]
    arr = np.asarray(ids)
    pos = np.flatnonzero(arr == image_token_id)
    n_full = len(pos) // n_image_tokens
    if len(pos) % n_image_tokens:
        cut = int(pos[n_full * n_image_tokens])
        ids, labels = ids[:cut], labels[:cut]
    labels = [IGNORE_INDEX if i == image_token_id else lab for i, lab in zip(ids, labels)]
    return ids, labels, n_full


class ConversationDataset:
    """Map-style dataset over indexed shards: item -> dict(input_ids, labels, pixel_values)."""

    def __init__(self, entries: list[Entry], tokenizer: Any, preprocess: Any, image_token_id: int,
                 n_image_tokens: int, max_len: int):
        self.entries = entries
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.image_token_id = image_token_id
        self.n_image_tokens = n_image_tokens
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from core.io.images import decode_image  # the project's checks: a bomb or corrupt image raises SampleError

        record, images = read_entry(self.entries[int(i)])
        ids, labels, n_img = encode_conversation(
            self.tokenizer, record["conversations"], self.image_token_id, self.n_image_tokens, self.max_len
        )
        pix = [self.preprocess(decode_image(b)) for b in images[:n_img]]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": torch.stack(pix) if pix else None,
        }


class Collator:
    """Right-pads a batch; images of all samples are concatenated in order (None when there are none)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for b, it in enumerate(items):
            k = len(it["input_ids"])
            ids[b, :k] = it["input_ids"]
            labels[b, :k] = it["labels"]
            mask[b, :k] = 1
        pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "pixel_values": torch.cat(pix) if pix else None,
        }
