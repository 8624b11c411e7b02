"""Synthetic LLaVA-style demo dataset with planted defects and a ground-truth file to score steps against.

`generate_demo(out_dir, n_samples=300, seed=0, corrupt=True)` writes::

    out_dir/data.json          a JSON array of LLaVA records (one record per line inside the array)
    out_dir/data.jsonl         the same records, one per line
    out_dir/images/<name>      the image files the records name (jpg, png, webp); image names in the
                               records are relative to out_dir/images (LLaVA's `image_folder`)
    out_dir/ground_truth.json  what was planted, by sample id (layout below)

A record is ``{"id": "demo_000123", "image": "demo_000123.png" | ["demo_000123_0.jpg", ...],
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...],
"source": "chartqa_like" | "count_like" | "doc_like" | "photo_like" | "text_only",
"domain": "chart" | "counting" | "document" | "photo" | "text"}`` (the domain is the scene family,
`DOMAINS`; planted eval copies are "web"); text-only records have no "image" key. Images are drawn charts, counted shapes, receipts/forms/memos and landscape
"photos" (core/demo/scenes.py); every answer is computed from the image's generating parameters.

ground_truth.json (keys sorted; every list of ids sorted)::

    {
      "n_samples": 300, "seed": 0, "corrupt_enabled": true,
      "near_duplicate_groups": [[id_original, id_near_copy], ...],  # same scene, image re-encoded at
                                                # another JPEG quality, resized or cropped; other text
      "near_duplicate_kinds": {id_near_copy: "jpeg_quality" | "resize" | "crop"},
      "exact_duplicate_groups": [[id, id], ...],   # identical image bytes and conversation, other id
      "garbled": [id, ...],                        # answers (and some questions) turned to word salad
      "garbled_kinds": {id: "word_salad" | "char_shuffle"},
      "unrelated": [id, ...],                      # "Generate underlying data table..." + unrelated table
      "verbose": [id, ...],                        # correct answer padded with assistant filler
      "corrupt": {id: kind},  # kind = the reason a validating reader should give: corrupt_image,
                              # missing_image, image_count_mismatch, role_broken, empty_conversation
      "corrupt_detail": {id: "truncated_jpeg" | "garbage_bytes" | "missing_file" | "extra_placeholder" |
                             "missing_placeholder" | "gpt_first" | "double_human" | "empty_list" |
                             "empty_answer"},
      "clean": [id, ...],       # samples with no planted defect (not in any list or group above)
      "sources": {id: source},  # every sample
      "structures": {id: "single_image" | "multi_turn" | "multi_image" | "text_only"}
    }

Each defective sample carries exactly one defect. Both members of a duplicate group count as
defective (neither is in "clean"); a dedup step should keep one member per group. Rates (of n_samples,
`DefectRates`): near-duplicate pairs 5% (so 10% of samples are in a pair), exact-duplicate pairs 3%,
garbled 5%, unrelated 5%, verbose 5%, and 9 corrupt samples (one per `corrupt_detail` kind) when
`corrupt=True`.

Output is a pure function of (n_samples, seed, corrupt): no timestamps, fixed encoder settings, and one
private RNG per sample, so two runs write byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from core.demo import scenes as S
from core.foundation.sample import IMAGE_TOKEN, strip_image_placeholders

SOURCES = ("chartqa_like", "count_like", "doc_like", "photo_like", "text_only")
SOURCE_WEIGHTS = (0.25, 0.2, 0.2, 0.2, 0.15)
IMAGE_SOURCES = SOURCES[:4]
# Each record's data domain (its scene family), as real mixtures label theirs: data mixing groups by it.
DOMAINS = {"chartqa_like": "chart", "count_like": "counting", "doc_like": "document", "photo_like": "photo",
           "text_only": "text", "web_copy": "web"}
FORMAT = {"chartqa_like": "png", "doc_like": "jpg", "photo_like": "jpg"}  # count_like: jpg or webp
CORRUPT_KINDS = {
    "truncated_jpeg": "corrupt_image", "garbage_bytes": "corrupt_image", "missing_file": "missing_image",
    "extra_placeholder": "image_count_mismatch", "missing_placeholder": "image_count_mismatch",
    "gpt_first": "role_broken", "double_human": "role_broken",
    "empty_list": "empty_conversation", "empty_answer": "empty_conversation",
}
MIN_SAMPLES = 40


@dataclass(frozen=True)
class DefectRates:
    """Planted-defect rates as fractions of n_samples (pairs count once; each has two members)."""

    near_dup_pairs: float = 0.05
    exact_dup_pairs: float = 0.03
    garbled: float = 0.05
    unrelated: float = 0.05
    verbose: float = 0.05


@dataclass
class DemoInfo:
    """Where the demo was written and what it holds."""

    out_dir: str
    data_json: str
    data_jsonl: str
    images_dir: str
    ground_truth: str
    n_samples: int
    n_images: int
    counts: dict[str, int] = field(default_factory=dict)  # defect -> number of samples carrying it
    seconds: float = 0.0

    def summary(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return (f"demo: {self.n_samples} samples, {self.n_images} image files in {self.out_dir} "
                f"({self.seconds:.1f} s)\n  {parts}")


@dataclass
class _Draft:
    """One record before writing: conversation plus the images it names (PIL, or raw bytes)."""

    source: str
    structure: str
    turns: list[list[str]]  # [[role, value], ...]
    images: list[Image.Image | bytes] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    scenes: list[S.Scene] = field(default_factory=list)
    qas: list[S.QA] = field(default_factory=list)


# ---- conversations ------------------------------------------------------------------------------


def _ask(qa: S.QA, style: str) -> tuple[str, str]:
    if style == "short" and qa.short_ok:
        return f"{qa.question}\n{S.SHORT_SUFFIX}", qa.short
    return qa.question, qa.sentence


def _conversation(qas: list[S.QA], style: str, n_images: int, rng: random.Random) -> list[list[str]]:
    """Human/gpt rounds; all `<image>` placeholders go into the first human turn, one per image."""
    turns: list[list[str]] = []
    for i, qa in enumerate(qas):
        q, a = _ask(qa, style)
        if i == 0 and n_images == 1:
            q = f"{IMAGE_TOKEN}\n{q}" if rng.random() < 0.9 else f"{q}\n{IMAGE_TOKEN}"
        elif i == 0 and n_images > 1:
            if rng.random() < 0.5:
                q = "\n".join([IMAGE_TOKEN] * n_images) + "\n" + q
            else:
                q = "\n".join(f"Image {k + 1}: {IMAGE_TOKEN}" for k in range(n_images)) + "\n" + q
        turns += [["human", q], ["gpt", a]]
    return turns


def _pick(pool: list[S.QA], k: int, rng: random.Random) -> list[S.QA]:
    uniq = list({qa.question: qa for qa in pool}.values())
    return rng.sample(uniq, min(k, len(uniq)))


def _clean_draft(rng: random.Random, nrng: np.random.Generator, *, source: str | None = None,
                 structure: str | None = None, style: str | None = None) -> _Draft:
    source = source or rng.choices(SOURCES, SOURCE_WEIGHTS)[0]
    style = style or rng.choice(["short", "sentence"])
    if source == "text_only":
        qas = [S.qa_text(rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        return _Draft(source, "text_only", _conversation(qas, style, 0, rng), qas=qas)
    structure = structure or rng.choices(["single_image", "multi_turn", "multi_image"], [0.6, 0.25, 0.15])[0]
    n_img = rng.randint(2, 3) if structure == "multi_image" else 1
    scenes = [S.MAKERS[source](rng) for _ in range(n_img)]
    if structure == "multi_image":
        qas = _pick(S.qa_multi(scenes, rng), rng.randint(1, 2), rng)
    else:
        qas = _pick(S.questions(scenes[0], rng), 1 if structure == "single_image" else rng.randint(2, 3), rng)
    fmt = FORMAT.get(source) or rng.choice(["jpg", "webp"])
    return _Draft(source, structure, _conversation(qas, style, n_img, rng),
                  images=[S.render(s, nrng) for s in scenes], formats=[fmt] * n_img, scenes=scenes, qas=qas)


# ---- defects ------------------------------------------------------------------------------------

FILLER_OPEN = [
    "Certainly! I would be more than happy to help you with this question.",
    "Great question! Let me take a careful and detailed look at this for you.",
    "Sure! After thoroughly analyzing all of the available information, I can provide a complete answer.",
]
FILLER_MID = [
    "As an AI language model, I always strive to provide accurate, detailed and helpful information.",
    "It is important to note that questions like this one require careful consideration of every detail.",
    "Before answering, it is worth mentioning that I have examined each and every element very closely.",
]
FILLER_CLOSE = [
    "I hope this explanation helps! Please let me know if you have any other questions.",
    "Feel free to ask if you would like me to elaborate further on any part of this answer.",
    "Thank you for your question, and I hope you found this detailed response useful!",
]
UNRELATED_Q = [
    "Generate underlying data table of the chart.",
    "Generate underlying data table of the figure.",
    "Convert the chart into a data table.",
    "Extract the data from the bar chart as a table.",
]
UNRELATED_HEADERS = ["Revenue in million U.S. dollars", "Share of respondents", "Number of users in millions",
                     "Sales volume in thousand units", "Export value in billion euros", "Unemployment rate"]
UNRELATED_TITLES = ["Global smartphone shipments", "Online retail sales worldwide", "Coffee consumption per capita",
                    "Broadband subscriptions", "Annual tourism receipts", "Crude oil production"]
NOISE_WORDS = ["blorp", "quandle", "zepht", "ugma", "the", "of", "splen", "krat", "ok", "vrim", "lo", "fadge"]


def _verbose(answer: str, rng: random.Random) -> str:
    core = answer[0].lower() + answer[1:] if not answer[:2].isupper() else answer
    return (f"{rng.choice(FILLER_OPEN)} {rng.choice(FILLER_MID)} {answer} "
            f"In conclusion, {core.rstrip('.')}. {rng.choice(FILLER_CLOSE)}")


def _scramble(word: str, rng: random.Random) -> str:
    chars = list(word)
    rng.shuffle(chars)
    return "".join(chars)


def _garble(text: str, extra: str, mode: str, rng: random.Random) -> str:
    """Word salad (shuffled words, nonsense words, broken characters) or per-word character shuffles."""
    words = (text + " " + extra).split()
    rng.shuffle(words)
    if mode == "char_shuffle":
        return " ".join(_scramble(w, rng) if len(w) > 2 else w for w in words)
    out = []
    for w in words:
        r = rng.random()
        out.append(rng.choice(NOISE_WORDS) if r < 0.35 else _scramble(w, rng) if r < 0.8 else w.lower())
    return " ".join(out)


def _unrelated_table(rng: random.Random) -> str:
    start = rng.randint(2008, 2016)
    rows = [f"{start + i} | {rng.uniform(1, 900):.1f}" for i in range(rng.randint(4, 7))]
    return "\n".join([f"TITLE | {rng.choice(UNRELATED_TITLES)}",
                      f"Characteristic | {rng.choice(UNRELATED_HEADERS)}"] + rows)


def _near_copy(img: Image.Image, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """The same scene, changed the way a re-posted image is: re-encoded, resized or slightly cropped."""
    if kind == "resize":
        s = rng.uniform(0.6, 0.8)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
        return _encode(img, "jpg", 85), "jpg"
    if kind == "crop":  # trim two adjacent edges by 1-2.5%, as when a re-post cuts off a border
        W, H = img.size
        dx, dy = round(W * rng.uniform(0.01, 0.025)), round(H * rng.uniform(0.01, 0.025))
        left, top = rng.choice([(0, 0), (dx, 0), (0, dy), (dx, dy)])
        return _encode(img.crop((left, top, W - dx + left, H - dy + top)), "jpg", 88), "jpg"
    return _encode(img, "jpg", rng.randint(30, 50)), "jpg"


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """Fixed encoder settings (no metadata, no optimizer passes) so bytes are reproducible."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4, lossless=False, exact=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


# ---- planning and writing -------------------------------------------------------------------------


def _plan(n: int, corrupt: bool, rates: DefectRates) -> list[tuple[str, int]]:
    """Groups as (kind, members); kinds: clean, near, exact, garbled, unrelated, verbose, corrupt:<detail>."""
    groups: list[tuple[str, int]] = []
    groups += [("near", 2)] * max(1, round(rates.near_dup_pairs * n))
    groups += [("exact", 2)] * max(1, round(rates.exact_dup_pairs * n))
    for kind in ("garbled", "unrelated", "verbose"):
        groups += [(kind, 1)] * max(1, round(getattr(rates, kind) * n))
    if corrupt:
        groups += [(f"corrupt:{d}", 1) for d in CORRUPT_KINDS]
    used = sum(m for _, m in groups)
    if n - used < n // 3:
        raise ValueError(f"n_samples={n} is too small for the planted defects ({used} defective samples)")
    return groups + [("clean", 1)] * (n - used)


def _build(kind: str, rng: random.Random, nrng: np.random.Generator) -> tuple[list[_Draft], dict]:
    """The drafts of one group and its ground-truth facts."""
    if kind == "clean":
        return [_clean_draft(rng, nrng)], {}
    if kind == "near":
        a = _clean_draft(rng, nrng, source=rng.choice(IMAGE_SOURCES), structure="single_image")
        nk = rng.choice(["jpeg_quality", "resize", "crop"])
        data, fmt = _near_copy(a.images[0], nk, rng)
        others = [qa for qa in S.questions(a.scenes[0], rng) if qa.question != a.qas[0].question] or a.qas
        qas = _pick(others, 1, rng)
        b = _Draft(a.source, "single_image", _conversation(qas, rng.choice(["short", "sentence"]), 1, rng),
                   images=[data], formats=[fmt], scenes=a.scenes, qas=qas)
        return [a, b], {"near_kind": nk}
    if kind == "exact":
        a = _clean_draft(rng, nrng, source=rng.choice(IMAGE_SOURCES), structure=rng.choice(["single_image",
                                                                                         "multi_turn"]))
        data = [_encode(im, f) for im, f in zip(a.images, a.formats, strict=True)]
        a.images = list(data)
        b = _Draft(a.source, a.structure, [list(t) for t in a.turns], images=list(data), formats=list(a.formats))
        return [a, b], {}
    if kind == "garbled":
        d = _clean_draft(rng, nrng, style="sentence")
        mode = rng.choice(["word_salad", "char_shuffle"])
        q_idx = [i for i, t in enumerate(d.turns) if t[0] == "human"]
        for qi, qa in zip(q_idx, d.qas, strict=True):
            d.turns[qi + 1][1] = _garble(qa.sentence, qa.question, mode, rng)
            if rng.random() < 0.4:  # the question too, keeping its image placeholders
                d.turns[qi][1] = d.turns[qi][1].replace(qa.question, _garble(qa.question, "", mode, rng))
        return [d], {"garbled_kind": mode}
    if kind == "unrelated":
        d = _clean_draft(rng, nrng, source=rng.choice(["count_like", "doc_like", "photo_like"]),
                         structure="single_image")
        d.turns = [["human", f"{IMAGE_TOKEN}\n{rng.choice(UNRELATED_Q)}"], ["gpt", _unrelated_table(rng)]]
        return [d], {}
    if kind == "verbose":
        d = _clean_draft(rng, nrng, style="sentence")
        for t in d.turns:
            if t[0] == "gpt":
                t[1] = _verbose(t[1], rng)
        return [d], {}
    detail = kind.split(":", 1)[1]
    d = _clean_draft(rng, nrng, source=rng.choice(IMAGE_SOURCES), structure="single_image")
    if detail == "truncated_jpeg":
        full = _encode(d.images[0], "jpg")
        d.images, d.formats = [full[: int(len(full) * 0.4)]], ["jpg"]
    elif detail == "garbage_bytes":
        d.images = [nrng.integers(0, 256, size=1500, dtype=np.uint8).tobytes()]
    elif detail == "missing_file":
        d.images = [b""]  # named in the record, never written
    elif detail == "extra_placeholder":
        d.turns[0][1] = f"{IMAGE_TOKEN}\n" + d.turns[0][1]
    elif detail == "missing_placeholder":
        d.turns[0][1] = strip_image_placeholders(d.turns[0][1])
    elif detail == "gpt_first":
        d.turns = [d.turns[1], d.turns[0]]
    elif detail == "double_human":
        d.turns = [d.turns[0], ["human", "Please answer the question above."], d.turns[1]]
    elif detail == "empty_list":
        d.turns = []
    elif detail == "empty_answer":
        d.turns[1][1] = ""
    return [d], {"corrupt_detail": detail}


def _image_names(sid: str, formats: list[str]) -> list[str]:
    if len(formats) == 1:
        return [f"{sid}.{formats[0]}"]
    return [f"{sid}_{i}.{f}" for i, f in enumerate(formats)]


def generate_demo(out_dir: str, n_samples: int = 300, seed: int = 0, corrupt: bool = True,
                  rates: DefectRates | None = None) -> DemoInfo:
    """Write the demo dataset (data.json, data.jsonl, images/, ground_truth.json) into `out_dir`.

    Deterministic: the same (n_samples, seed, corrupt, rates) gives byte-identical files. An existing
    `out_dir/images` is replaced so stale images never linger.
    """
    t0 = time.perf_counter()
    if n_samples < MIN_SAMPLES:
        raise ValueError(f"n_samples must be at least {MIN_SAMPLES} to hold every planted defect")
    rates = rates or DefectRates()
    groups = _plan(n_samples, corrupt, rates)
    order = list(range(n_samples))
    random.Random(seed).shuffle(order)  # group members land at random positions, so defects interleave
    img_dir = os.path.join(out_dir, "images")
    if os.path.isdir(img_dir):
        shutil.rmtree(img_dir)
    os.makedirs(img_dir)

    gt: dict = {"n_samples": n_samples, "seed": seed, "corrupt_enabled": corrupt, "near_duplicate_groups": [],
                "near_duplicate_kinds": {}, "exact_duplicate_groups": [], "garbled": [], "garbled_kinds": {},
                "unrelated": [], "verbose": [], "corrupt": {}, "corrupt_detail": {}, "clean": [], "sources": {},
                "structures": {}}
    records: dict[int, dict] = {}
    n_images = 0
    slot = 0
    for gi, (kind, members) in enumerate(groups):
        rng = random.Random(seed * 1_000_003 + gi)
        nrng = np.random.default_rng([seed, gi])
        drafts, facts = _build(kind, rng, nrng)
        assert len(drafts) == members
        idx = order[slot: slot + members]
        slot += members
        ids = [f"demo_{i:06d}" for i in idx]
        for i, sid, d in zip(idx, ids, drafts, strict=True):
            names = _image_names(sid, d.formats)
            for name, im, fmt in zip(names, d.images, d.formats, strict=True):
                if kind == "corrupt:missing_file":
                    continue
                data = im if isinstance(im, bytes) else _encode(im, fmt, 90 if fmt == "jpg" else 85)
                with open(os.path.join(img_dir, name), "wb") as f:
                    f.write(data)
                n_images += 1
            rec: dict = {"id": sid}
            if names:
                rec["image"] = names[0] if len(names) == 1 else names
            rec["conversations"] = [{"from": r, "value": v} for r, v in d.turns]
            rec["source"] = d.source
            rec["domain"] = DOMAINS[d.source]
            records[i] = rec
            gt["sources"][sid] = d.source
            gt["structures"][sid] = d.structure
        if kind == "near":
            gt["near_duplicate_groups"].append(ids)
            gt["near_duplicate_kinds"][ids[1]] = facts["near_kind"]
        elif kind == "exact":
            gt["exact_duplicate_groups"].append(sorted(ids))
        elif kind == "garbled":
            gt["garbled"].append(ids[0])
            gt["garbled_kinds"][ids[0]] = facts["garbled_kind"]
        elif kind in ("unrelated", "verbose"):
            gt[kind].append(ids[0])
        elif kind.startswith("corrupt:"):
            gt["corrupt"][ids[0]] = CORRUPT_KINDS[facts["corrupt_detail"]]
            gt["corrupt_detail"][ids[0]] = facts["corrupt_detail"]
        else:
            gt["clean"].append(ids[0])
    for key in ("near_duplicate_groups", "exact_duplicate_groups"):
        gt[key].sort()
    for key in ("garbled", "unrelated", "verbose", "clean"):
        gt[key].sort()

    paths = _write_dataset(out_dir, [records[i] for i in range(n_samples)], gt)
    counts = {
        "clean": len(gt["clean"]),
        "near_duplicate": sum(len(g) for g in gt["near_duplicate_groups"]),
        "exact_duplicate": sum(len(g) for g in gt["exact_duplicate_groups"]),
        "garbled": len(gt["garbled"]), "unrelated": len(gt["unrelated"]), "verbose": len(gt["verbose"]),
        "corrupt": len(gt["corrupt"]),
    }
    return DemoInfo(out_dir=out_dir, data_json=paths["data.json"], data_jsonl=paths["data.jsonl"],
                    images_dir=img_dir, ground_truth=paths["ground_truth.json"], n_samples=n_samples,
                    n_images=n_images, counts=counts, seconds=time.perf_counter() - t0)


def plant_eval_contamination(out_dir: str, eval_cache: str, benchmarks: list[str] | None = None,
                             per_benchmark: int = 1) -> dict[str, str]:
    """Append training samples that copy eval items' images to a generated demo dataset (in place).

    Per benchmark, the first `per_benchmark` loadable items become records `demo_evalcopy_<benchmark>_<k>`:
    even k an exact copy of the eval image, odd k re-encoded as JPEG (quality 85), with a training-style
    question and answer. data.json, data.jsonl and ground_truth.json (`eval_contamination`: {id: benchmark},
    `n_samples`) are rewritten; decontamination should drop exactly these. Returns {id: benchmark}.
    """
    from PIL import Image

    from core.evals.base import LoadFailure
    from core.evals.registry import benchmark_names, get_benchmark
    from core.io.images import decode_image, image_ext

    gt = load_ground_truth(out_dir)
    records = load_records(out_dir)
    planted: dict[str, str] = {}
    for b in benchmarks or benchmark_names():
        k = 0
        for item in get_benchmark(b).load(os.path.join(eval_cache, b)):
            if k >= per_benchmark:
                break
            if isinstance(item, LoadFailure):
                continue
            try:
                decode_image(item.images[0])
            except ValueError:  # a planted corrupt eval image: not something a training set would copy
                continue
            data = item.images[0]
            if k % 2:
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=85)
                data = buf.getvalue()
            sid = f"demo_evalcopy_{b}_{k}"
            name = f"{sid}.{image_ext(data)}"
            with open(os.path.join(out_dir, "images", name), "wb") as f:
                f.write(data)
            records.append({"id": sid, "image": name, "source": "web_copy", "domain": DOMAINS["web_copy"],
                            "conversations": [
                {"from": "human", "value": "<image>\nDescribe what this image shows."},
                {"from": "gpt", "value": "The image shows a simple drawing with a few shapes and some text."}]})
            planted[sid] = b
            k += 1
    gt["eval_contamination"] = dict(sorted({**gt.get("eval_contamination", {}), **planted}.items()))
    gt["n_samples"] = len(records)
    for sid in planted:
        gt["sources"][sid] = "web_copy"
    _write_dataset(out_dir, records, gt)
    return planted


def _write_dataset(out_dir: str, records: list[dict], gt: dict) -> dict[str, str]:
    """Write data.json (one record a line inside the array), data.jsonl and ground_truth.json; their paths."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    paths = {name: os.path.join(out_dir, name) for name in ("data.json", "data.jsonl", "ground_truth.json")}
    with open(paths["data.json"], "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(lines) + "\n]\n")
    with open(paths["data.jsonl"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths["ground_truth.json"], "w", encoding="utf-8") as f:
        json.dump(gt, f, indent=1, sort_keys=True)
        f.write("\n")
    return paths


# ---- readers for later steps ---------------------------------------------------------------------


def load_ground_truth(out_dir: str) -> dict:
    """The planted-defect ground truth written by `generate_demo`."""
    with open(os.path.join(out_dir, "ground_truth.json"), encoding="utf-8") as f:
        return json.load(f)


def load_records(out_dir: str) -> list[dict]:
    """All demo records (data.jsonl), in file order."""
    with open(os.path.join(out_dir, "data.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def conversation_text(record: dict) -> str:
    """All turns of a record joined by newlines, `<image>` placeholders removed."""
    return "\n".join(strip_image_placeholders(t["value"]) for t in record.get("conversations", []))


def clean_records(out_dir: str, include_duplicates: bool = False) -> list[dict]:
    """Records without a planted defect; with `include_duplicates`, also the members of duplicate
    groups (their text is clean; only their images repeat)."""
    gt = load_ground_truth(out_dir)
    keep = set(gt["clean"])
    if include_duplicates:
        keep |= {i for g in gt["near_duplicate_groups"] + gt["exact_duplicate_groups"] for i in g}
    return [r for r in load_records(out_dir) if r["id"] in keep]


def clean_texts(out_dir: str, include_duplicates: bool = False) -> list[str]:
    """Conversation texts of the clean samples (training text for the project's tiny LM)."""
    return [conversation_text(r) for r in clean_records(out_dir, include_duplicates)]


def to_messages(record: dict) -> list[dict[str, str]]:
    """A record's turns as chat messages (`role` user/assistant/system, `content`), placeholders kept."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in record.get("conversations", [])]


def clean_messages(out_dir: str, include_duplicates: bool = False) -> list[list[dict[str, str]]]:
    """Clean samples as chat messages (what `core.models.tiny_lm.ensure_tiny_lm` trains on with ChatML)."""
    return [to_messages(r) for r in clean_records(out_dir, include_duplicates)]


def main(argv: list[str] | None = None) -> DemoInfo:
    ap = argparse.ArgumentParser(description="Write the synthetic mmcurate demo dataset with planted defects.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n", type=int, default=300, help="number of samples (>= %d)" % MIN_SAMPLES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-corrupt", action="store_true", help="plant no corrupt samples")
    ap.add_argument("--contaminate-from", default="", metavar="EVAL_CACHE",
                    help="also plant copies of eval items from this benchmark cache (core.demo.eval_fixtures)")
    args = ap.parse_args(argv)
    info = generate_demo(args.out, n_samples=args.n, seed=args.seed, corrupt=not args.no_corrupt)
    print(info.summary())
    if args.contaminate_from:
        planted = plant_eval_contamination(args.out, args.contaminate_from, per_benchmark=2)
        print(f"  planted {len(planted)} eval copies: {', '.join(planted)}")
    print(f"  ground truth: {info.ground_truth}")
    return info


if __name__ == "__main__":
    main()
