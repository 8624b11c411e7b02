"""Tiny benchmark caches in each benchmark's published layout, with small drawn images, for tests and the
demo. Everything here is made by the project (no downloads); sizes are a few KB.

`write_fixtures(root)` writes `<root>/<benchmark>/...` for all five benchmarks and returns the ground
truth per benchmark. With `defects=True` it also plants rows the loaders must report rather than crash on
(a corrupt image in CountBench, a PixMo-Points image missing from the cache).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np

_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220)}


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _canvas(w: int, h: int) -> tuple[Any, Any]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def _hf_image(data: bytes, name: str) -> dict[str, Any]:
    return {"bytes": data, "path": name}


def _write_parquet(rows: list[dict[str, Any]], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _circles(n: int, w: int = 64, h: int = 48, r: int = 5, seed: int = 0) -> list[tuple[int, int]]:
    """n non-overlapping circle centres on a grid (deterministic)."""
    rng = np.random.default_rng(seed)
    cells = [(x, y) for y in range(r + 2, h - r - 1, 2 * r + 4) for x in range(r + 2, w - r - 1, 2 * r + 4)]
    idx = rng.choice(len(cells), size=n, replace=False)
    return [cells[i] for i in sorted(idx)]


def write_countbench(root: str, defects: bool = True) -> dict[str, int]:
    rows = []
    for i, n in enumerate([2, 3, 5, 7]):
        img, d = _canvas(64, 48)
        for x, y in _circles(n, seed=i):
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=_COLORS["red"])
        rows.append({"image": _hf_image(_png(img), f"{i}.png"), "text": f"{n} red circles on white",
                     "question": "How many red circles are in the image?", "number": n})  # fmt: skip
    if defects:
        rows.append({"image": _hf_image(b"not an image", "bad.png"), "text": "corrupt",
                     "question": "How many dogs are there?", "number": 1})  # fmt: skip
    _write_parquet(rows, os.path.join(root, "data", "test-00000-of-00001.parquet"))
    return {f"countbench-{i:05d}": r["number"] for i, r in enumerate(rows)}


def write_docvqa(root: str) -> dict[str, list[str]]:
    docs = [("TOTAL: 42", "What is the total?", ["42", "42.00"]),
            ("DATE: 1998", "What year is the document from?", ["1998"]),
            ("TO: ACME CORP", "Who is the letter addressed to?", ["ACME CORP", "Acme Corporation"])]  # fmt: skip
    rows, truth = [], {}
    for i, (text, q, answers) in enumerate(docs):
        img, d = _canvas(120, 40)
        d.text((4, 14), text, fill=(0, 0, 0))
        qid = 1000 + i
        rows.append({"questionId": str(qid), "question": q, "question_types": ["form"],
                     "image": _hf_image(_png(img), f"doc{i}.png"), "docId": 10 + i, "ucsf_document_id": f"u{i}",
                     "ucsf_document_page_no": "1", "answers": answers, "data_split": "val"})  # fmt: skip
        truth[f"docvqa-{qid}"] = answers
    _write_parquet(rows, os.path.join(root, "DocVQA", "validation-00000-of-00001.parquet"))
    return truth


def _bar_chart(values: list[float], labels: list[str]) -> bytes:
    img, d = _canvas(80, 60)
    top = max(values)
    for k, (v, lab) in enumerate(zip(values, labels, strict=True)):
        x0 = 6 + k * 24
        d.rectangle([x0, 50 - int(40 * v / top), x0 + 14, 50], fill=list(_COLORS.values())[k % 3])
        d.text((x0, 51), lab[:3], fill=(0, 0, 0))
    return _png(img)


def write_chartqa(root: str) -> dict[str, str]:
    """Original ChartQA release layout: test/test_{human,augmented}.json + test/png/."""
    sets = {
        "human": [([10, 30, 20], ["Red", "Green", "Blue"], "Which color has the tallest bar?", "Green"),
                  ([1200, 800, 1000], ["A", "B", "C"], "What is the value of bar A?", "1200")],
        "augmented": [([45, 20, 35], ["X", "Y", "Z"], "What percentage does X have?", "45"),
                      ([3, 6, 9], ["P", "Q", "R"], "What is the sum of P and Q?", "9")],
    }  # fmt: skip
    os.makedirs(os.path.join(root, "test", "png"), exist_ok=True)
    truth = {}
    for split, items in sets.items():
        recs = []
        for i, (vals, labels, q, a) in enumerate(items):
            name = f"{split}_{i}.png"
            with open(os.path.join(root, "test", "png", name), "wb") as f:
                f.write(_bar_chart(vals, labels))
            recs.append({"imgname": name, "query": q, "label": a})
            truth[f"chartqa-{split}-{i:05d}"] = a
        with open(os.path.join(root, "test", f"test_{split}.json"), "w") as f:
            json.dump(recs, f)
    return truth


def write_realworldqa(root: str) -> dict[str, str]:
    suffix = "\nPlease answer directly with only the letter of the correct option and nothing else."
    rows, truth = [], {}
    for i, color in enumerate(["red", "green", "blue"]):
        img, d = _canvas(48, 48)
        d.rectangle([12, 12, 36, 36], fill=_COLORS[color])
        q = "What color is the square?\nA. Red\nB. Green\nC. Blue" + suffix
        rows.append({"image": _hf_image(_png(img), f"{i}.png"), "question": q, "answer": "ABC"[i]})
    img, d = _canvas(48, 48)
    for x in (8, 28):
        d.rectangle([x, 16, x + 12, 28], fill=_COLORS["blue"])
    rows.append({"image": _hf_image(_png(img), "3.png"), "question": "How many squares are there?", "answer": "2"})
    _write_parquet(rows, os.path.join(root, "data", "test-00000-of-00001.parquet"))
    for i, r in enumerate(rows):
        truth[f"realworldqa-{i:05d}"] = r["answer"]
    return truth


def write_pixmo_points(root: str, defects: bool = True) -> dict[str, list[list[float]]]:
    """PixMo-Points-Eval layout: data/test-*.parquet (image_url, image_sha256, label, points, masks) and the
    downloaded images as images/<sha256>.png."""
    w, h, r = 64, 48, 5
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows, truth = [], {}
    specs = [(3, "red circle"), (1, "red circle"), (0, "blue triangle")]
    for i, (n, label) in enumerate(specs):
        img, d = _canvas(w, h)
        centres = _circles(max(n, 2), w, h, r, seed=10 + i)[:n] if n else _circles(2, w, h, r, seed=10 + i)
        fill = _COLORS["red"] if n else _COLORS["green"]  # the no-target image shows green circles only
        masks = []
        yy, xx = np.mgrid[0:h, 0:w]
        for x, y in centres:
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            if n:
                masks.append(((xx - x) ** 2 + (yy - y) ** 2 <= r * r).tolist())
        if not masks:
            masks = [np.zeros((h, w), dtype=bool).tolist()]  # the published rows carry one empty mask
        data = _png(img)
        sha = hashlib.sha256(data).hexdigest()
        with open(os.path.join(root, "images", f"{sha}.png"), "wb") as f:
            f.write(data)
        pts = [{"x": float(x), "y": float(y)} for x, y in centres] if n else []
        rows.append({"image_url": f"https://example.invalid/{sha[:8]}.png", "image_sha256": sha, "label": label,
                     "points": pts, "masks": masks})  # fmt: skip
        truth[f"pixmo_points-{i:05d}"] = [[p["x"] / w * 100, p["y"] / h * 100] for p in pts]
    if defects:
        rows.append({"image_url": "https://example.invalid/missing.png", "image_sha256": "0" * 64,
                     "label": "red circle", "points": [{"x": 1.0, "y": 1.0}], "masks": masks})  # fmt: skip
    _write_parquet(rows, os.path.join(root, "data", "test-00000-of-00001.parquet"))
    return truth


def write_fixtures(root: str, defects: bool = True) -> dict[str, dict[str, Any]]:
    """Write all five benchmark caches under `root`; return {benchmark: {sample_id: ground truth}}.
    PixMo truth is given as percent coordinates (the answer format the prompt asks for)."""
    return {
        "countbench": write_countbench(os.path.join(root, "countbench"), defects),
        "docvqa": write_docvqa(os.path.join(root, "docvqa")),
        "chartqa": write_chartqa(os.path.join(root, "chartqa")),
        "realworldqa": write_realworldqa(os.path.join(root, "realworldqa")),
        "pixmo_points": write_pixmo_points(os.path.join(root, "pixmo_points"), defects),
    }
