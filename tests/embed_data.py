"""Synthetic images and WDS shards for the embedding tests and benchmark (no network, seeded)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image, ImageDraw

from core.foundation.sample import Sample, Turn
from core.io.wds import write_shards


def scene(seed: int, size: int = 256) -> Image.Image:
    """A random composition of coloured rectangles/ellipses on a coloured background."""
    r = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(x) for x in r.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = (int(v) for v in r.integers(0, size, 2))
        w, h = (int(v) for v in r.integers(size // 12, size // 2, 2))
        c = tuple(int(x) for x in r.integers(0, 256, 3))
        (d.ellipse if r.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h], fill=c)
    return im


def encode(im: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def near_duplicates(im: Image.Image) -> list[Image.Image]:
    """Re-encoded, resized, cropped, and resized+re-encoded copies of an image."""
    s = im.size[0]
    rt = Image.open(io.BytesIO(encode(im, quality=35))).convert("RGB")
    small = im.resize((s * 2 // 3, s * 2 // 3), Image.BICUBIC)
    crop = im.crop((s // 10, s // 10, s - s // 10, s - s // 10))
    both = Image.open(io.BytesIO(encode(im.resize((s * 3 // 4, s * 3 // 4)), quality=60))).convert("RGB")
    return [rt, small, crop, both]


def sample(sid: str, images: list[bytes], question: str = "What is shown?", answer: str = "Shapes.",
           source: str = "synth") -> Sample:
    tokens = "".join("<image>\n" for _ in images)
    s = Sample(id=sid, conversations=[Turn("human", tokens + question), Turn("gpt", answer)],
               images=[f"{sid}_{i}.jpg" for i in range(len(images))], source=source)
    s.image_bytes = list(images)
    return s


def corrupt_jpeg(seed: int) -> bytes:
    """JPEG magic and header, then garbage: decodes to corrupt_image."""
    good = encode(scene(seed, 64))
    return good[:200] + bytes(np.random.default_rng(seed).integers(0, 256, 300, dtype=np.uint8))


def bomb_png() -> bytes:
    """A 10000x10000 1-bit PNG (~100 MP > Pillow's limit), a few KB on disk: decompression_bomb."""
    return encode(Image.new("1", (10_000, 10_000)), "PNG")


def mixed_samples(n: int, seed: int = 0, size: int = 128, prefix: str = "s") -> list[Sample]:
    """Mostly single-image samples, every 5th two images, every 7th text-only."""
    out = []
    for i in range(n):
        sid = f"{prefix}{seed}_{i:04d}"
        if i % 7 == 6:
            out.append(sample(sid, [], question=f"Tell me fact {i}.", answer="A fact."))
        elif i % 5 == 4:
            out.append(sample(sid, [encode(scene(seed * 10_000 + i, size)), encode(scene(seed * 10_000 + i + 5000, size))],
                              question=f"Compare picture pair {i}."))
        else:
            out.append(sample(sid, [encode(scene(seed * 10_000 + i, size))], question=f"Describe picture {i}."))
    return out


def write_test_shards(out_dir: str, samples: list[Sample], per_shard: int) -> list[str]:
    return [s.path for s in write_shards(samples, out_dir, max_samples=per_shard)]


def truncate_tar(path: str, keep_members: int) -> None:
    """Cut a tar after `keep_members` members plus part of the next (no end-of-archive blocks)."""
    with tarfile.open(path) as t:
        members = t.getmembers()
    m = members[keep_members]
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: m.offset_data + max(1, m.size // 2)])
