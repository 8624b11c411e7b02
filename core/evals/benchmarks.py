"""The five built-in benchmarks. Each reads the layout its publisher distributes (HF dataset parquet exports
or the original JSON release) from a cache directory; docs/evals.md lists the layouts and every choice.

Prompts follow lmms-eval's default `pre_prompt`/`post_prompt` for the task; PixMo-Points (not in
lmms-eval) asks for Molmo's point format. `reference` scores a reply exactly as lmms-eval's task code (or
Molmo's PointingEval) does: the default score. `parse` + `score` are the lenient scoring (opt-in).
"""

from __future__ import annotations

import io as _io
from collections.abc import Iterator
from typing import Any

import numpy as np

from core.evals import io
from core.evals.base import Benchmark, EvalItem, LoadFailure, Parsed, Reference, Scored
from core.evals.exact import (
    lmms_anls,
    lmms_count_answer,
    lmms_relaxed_correctness,
    molmo_extract_points,
    molmo_pointing,
    molmo_valid_format,
    realworldqa_score,
)
from core.evals.metrics import anls, count_correct, point_scores, relaxed_correctness
from core.evals.parsing import extract_options, parse_choice, parse_count, parse_points, parse_short_answer

SHORT_ANSWER_POST = "\nAnswer the question using a single word or phrase."  # lmms-eval docvqa default
CHARTQA_POST = "\nAnswer the question with a single word."  # lmms-eval chartqa default


def _parquet_files(root: str, *patterns: str) -> list[str]:
    for pat in patterns:
        files = io.glob(io.join(root, pat))
        if files:
            return files
    raise FileNotFoundError(f"no parquet files under {root} (looked for {', '.join(patterns)})")


def _image_item(row_id: str, row: dict[str, Any], key: str = "image") -> bytes | LoadFailure:
    try:
        return io.image_struct_bytes(row.get(key))
    except ValueError as e:
        return LoadFailure(row_id, f"missing_image:{e}")


def _unsafe_name(name: Any) -> str:
    """Why an image name from a benchmark's JSON must not be joined to its image folder ("" when it may):
    absolute, with `..`, or with NUL/control characters, it would read a file outside the folder."""
    if not isinstance(name, str) or not name:
        return f"imgname {name!r} is not a file name"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        return f"imgname {name!r} leaves the image folder"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"imgname {name!r} has a control character"
    return ""


class CountBench(Benchmark):
    """CountBenchQA (HF `vikhyatk/CountBenchQA`): `<root>/data/*.parquet`, columns image{bytes,path},
    text, question, number. Metric: exact count (accuracy)."""

    name = "countbench"
    metric_name = "acc"
    lenient_metric_name = "accuracy"
    max_new_tokens = 16
    PRE = "Look at the image carefully and count the objects. Answer with just a number, without any additional text. "

    def load(self, root: str) -> Iterator[EvalItem | LoadFailure]:
        for i, row in enumerate(io.iter_parquet_rows(_parquet_files(root, "data/*.parquet", "*.parquet"))):
            sid = f"countbench-{i:05d}"
            img = _image_item(sid, row)
            if isinstance(img, LoadFailure):
                yield img
                continue
            yield EvalItem(sid, [img], str(row["question"]).strip(), int(row["number"]), {"text": row.get("text")})

    def prompt(self, item: EvalItem) -> str:
        return f"{self.PRE}{item.question}"

    def reference(self, output: str, item: EvalItem) -> Reference:
        pred = lmms_count_answer(output)
        acc = float(pred == lmms_count_answer(item.target))
        return Reference(pred, pred.isdigit(), {"acc": acc}, acc, acc == 1.0)

    def parse(self, output: str, item: EvalItem) -> Parsed:
        return parse_count(output)

    def score(self, parsed: Parsed, item: EvalItem) -> Scored:
        ok = parsed.ok and count_correct(parsed.value, item.target)
        return Scored(float(ok), ok)


class DocVQA(Benchmark):
    """DocVQA validation (HF `lmms-lab/DocVQA`, config DocVQA): `<root>/DocVQA/validation-*.parquet`,
    columns questionId, question, answers (list of strings), image{bytes,path}, docId, ... .
    Metric: ANLS (threshold 0.5)."""

    name = "docvqa"
    metric_name = "anls"
    lenient_metric_name = "anls"
    max_new_tokens = 32

    def load(self, root: str) -> Iterator[EvalItem | LoadFailure]:
        files = _parquet_files(root, "DocVQA/validation-*.parquet", "validation-*.parquet", "data/validation-*.parquet")
        for row in io.iter_parquet_rows(files):
            sid = f"docvqa-{row['questionId']}"
            answers = [str(a) for a in (row.get("answers") or [])]
            if not answers:
                yield LoadFailure(sid, "missing_answers")
                continue
            img = _image_item(sid, row)
            if isinstance(img, LoadFailure):
                yield img
                continue
            yield EvalItem(sid, [img], str(row["question"]).strip(), answers, {"docId": row.get("docId")})

    def prompt(self, item: EvalItem) -> str:
        return f"{item.question}{SHORT_ANSWER_POST}"

    def reference(self, output: str, item: EvalItem) -> Reference:
        s = float(lmms_anls(output, item.target))
        return Reference(output, bool(output.strip()), {"anls": s}, s, s > 0.0)

    def parse(self, output: str, item: EvalItem) -> Parsed:
        return parse_short_answer(output)

    def score(self, parsed: Parsed, item: EvalItem) -> Scored:
        s = anls(parsed.value if parsed.ok else "", item.target)
        return Scored(s, s > 0.0)

    def gold_answer(self, item: EvalItem) -> str | None:
        return str(item.target[0])  # the first reference answer (lmms-eval's doc_to_target for docvqa)


class ChartQA(Benchmark):
    """ChartQA test, either layout:
    - original release (github vis-nlp/ChartQA): `<root>/test/test_human.json` and `test_augmented.json`
      (lists of {"imgname", "query", "label"}) with images in `<root>/test/png/<imgname>`;
    - HF `lmms-lab/ChartQA`: `<root>/data/test-*.parquet`, columns type (human_test|augmented_test),
      question, answer, image{bytes,path}.
    Metric: relaxed accuracy (5% numeric tolerance); `meta.split` keeps the human/augmented split."""

    name = "chartqa"
    metric_name = "relaxed_overall"
    lenient_metric_name = "relaxed_accuracy"
    max_new_tokens = 16

    def load(self, root: str) -> Iterator[EvalItem | LoadFailure]:
        human = io.join(root, "test/test_human.json")
        if io.exists(human):
            for split in ("human", "augmented"):
                path = io.join(root, f"test/test_{split}.json")
                if not io.exists(path):
                    continue
                for i, rec in enumerate(io.read_json(path)):
                    sid = f"chartqa-{split}-{i:05d}"
                    bad = _unsafe_name(rec["imgname"]) if isinstance(rec, dict) and "imgname" in rec else ""
                    if bad:
                        yield LoadFailure(sid, f"unsafe_path:{bad}")
                        continue
                    try:
                        img = io.read_bytes(io.join(root, "test/png", rec["imgname"]))
                    except (FileNotFoundError, KeyError) as e:
                        yield LoadFailure(sid, f"missing_image:{e}")
                        continue
                    yield EvalItem(sid, [img], str(rec["query"]).strip(), str(rec["label"]), {"split": split})
            return
        for i, row in enumerate(io.iter_parquet_rows(_parquet_files(root, "data/test-*.parquet", "test-*.parquet"))):
            split = "human" if str(row.get("type", "")).startswith("human") else "augmented"
            sid = f"chartqa-{split}-{i:05d}"
            img = _image_item(sid, row)
            if isinstance(img, LoadFailure):
                yield img
                continue
            yield EvalItem(sid, [img], str(row["question"]).strip(), str(row["answer"]), {"split": split})

    def prompt(self, item: EvalItem) -> str:
        return f"{item.question}{CHARTQA_POST}"

    def reference(self, output: str, item: EvalItem) -> Reference:
        v = 1.0 if lmms_relaxed_correctness(output, item.target) else 0.0
        split = "relaxed_human_split" if item.meta.get("split") == "human" else "relaxed_augmented_split"
        return Reference(output, bool(output.strip()), {"relaxed_overall": v, split: v}, v, v == 1.0)

    def parse(self, output: str, item: EvalItem) -> Parsed:
        return parse_short_answer(output)

    def score(self, parsed: Parsed, item: EvalItem) -> Scored:
        ok = parsed.ok and relaxed_correctness(parsed.value, item.target)
        return Scored(float(ok), ok)


class RealWorldQA(Benchmark):
    """RealWorldQA (HF `lmms-lab/RealWorldQA`, same columns as `xai-org/RealworldQA`):
    `<root>/data/test-*.parquet`, columns image{bytes,path}, question (options inline as 'A. ...' lines
    plus the instruction to answer with a letter), answer (the letter, or a short free-form answer).
    Metric: exact match of the option letter (letter or option text accepted)."""

    name = "realworldqa"
    metric_name = "exact_match"
    lenient_metric_name = "accuracy"
    max_new_tokens = 16

    def load(self, root: str) -> Iterator[EvalItem | LoadFailure]:
        for i, row in enumerate(io.iter_parquet_rows(_parquet_files(root, "data/test-*.parquet", "test-*.parquet"))):
            sid = f"realworldqa-{i:05d}"
            img = _image_item(sid, row)
            if isinstance(img, LoadFailure):
                yield img
                continue
            q = str(row["question"]).strip()
            yield EvalItem(sid, [img], q, str(row["answer"]).strip(), {"options": extract_options(q)})

    def prompt(self, item: EvalItem) -> str:
        return item.question

    def reference(self, output: str, item: EvalItem) -> Reference:
        extracted, v = realworldqa_score(output, item.target)
        return Reference(extracted, bool(extracted), {"exact_match": v}, v, v == 1.0)

    def parse(self, output: str, item: EvalItem) -> Parsed:
        return parse_choice(output, item.meta.get("options") or {})

    def score(self, parsed: Parsed, item: EvalItem) -> Scored:
        target = item.target if item.meta.get("options") else parse_choice(item.target, {}).value
        ok = parsed.ok and str(parsed.value).upper() == str(target).upper()
        return Scored(float(ok), ok)

    def choices(self, item: EvalItem) -> tuple[list[str], int | None] | None:
        """The option letters (the prompt asks for the letter), gold = the target letter."""
        letters = sorted(item.meta.get("options") or {})
        if len(letters) < 2:
            return None  # a free-form question (RealWorldQA has a few)
        gold = str(item.target).strip().upper()
        return letters, letters.index(gold) if gold in letters else None


class PixMoPoints(Benchmark):
    """PixMo-Points-Eval (HF `allenai/pixmo-points-eval`): `<root>/data/test-*.parquet`, columns image_url,
    image_sha256, label, points (list of {x, y} pixels), masks (list of H x W bool masks). Images are
    published as URLs; the cache holds them as `<root>/images/<image_sha256>[.ext]`; the sha256 is checked.
    Metric: F1 of points inside masks (one-to-one matching); precision/recall in `details`."""

    name = "pixmo_points"
    metric_name = "f1"
    lenient_metric_name = "f1"
    max_new_tokens = 256

    def load(self, root: str) -> Iterator[EvalItem | LoadFailure]:
        import hashlib

        by_sha = {p.rsplit("/", 1)[-1].split(".", 1)[0]: p for p in io.glob(io.join(root, "images/*"))}
        for i, row in enumerate(io.iter_parquet_rows(_parquet_files(root, "data/test-*.parquet", "test-*.parquet"))):
            sha = str(row.get("image_sha256") or "")
            sid = f"pixmo_points-{i:05d}"
            if sha not in by_sha:
                yield LoadFailure(sid, "missing_image:not in cache")
                continue
            data = io.read_bytes(by_sha[sha])
            if hashlib.sha256(data).hexdigest() != sha:
                yield LoadFailure(sid, "image_sha256_mismatch")
                continue
            masks = row.get("masks") or []
            points = [[float(p["x"]), float(p["y"])] for p in (row.get("points") or [])]
            target = {"points": points, "masks": masks}
            yield EvalItem(sid, [data], str(row["label"]).strip(), target, {"image_url": row.get("image_url")})

    def prompt(self, item: EvalItem) -> str:
        q = item.question
        return (
            f"Point to all of the following in the image: {q}. Reply in Molmo's point format, x and y in percent "
            f'of the image width and height (0-100): <point x="X" y="Y" alt="{q}">{q}</point> for one object, '
            f'<points x1="X1" y1="Y1" x2="X2" y2="Y2" alt="{q}">{q}</points> for several, or "There are none." '
            "if there is none."
        )

    def reference(self, output: str, item: EvalItem) -> Reference:
        from PIL import Image

        size = Image.open(_io.BytesIO(item.images[0])).size
        pts = [[float(v) for v in p] for p in molmo_extract_points(output.strip(), *size)]
        ok = molmo_valid_format(output) or not pts
        m = molmo_pointing(output, item.target["points"], item.target["masks"], size)
        if m is None:  # Molmo's evaluator raises on this reply and leaves the sample out of its means
            return Reference(pts, ok, {}, None, False)
        return Reference(pts, ok, m, m["f1"], m["f1"] >= 1 - 1e-9)

    def parse(self, output: str, item: EvalItem) -> Parsed:
        return parse_points(output)

    def score(self, parsed: Parsed, item: EvalItem) -> Scored:
        from PIL import Image

        w, h = Image.open(_io.BytesIO(item.images[0])).size
        masks = [np.asarray(m, dtype=bool) for m in item.target["masks"]]
        pts = [(x / 100.0 * w, y / 100.0 * h) for x, y in (parsed.value or [])] if parsed.ok else []
        s = point_scores(pts, masks, (w, h))
        if not parsed.ok:
            return Scored(0.0, False, {"precision": 0.0, "recall": 0.0, "n_gt": s.n_gt})
        details = {k: getattr(s, k) for k in ("precision", "recall", "n_pred", "n_gt", "n_tp", "n_outside")}
        return Scored(s.f1, s.f1 == 1.0, details)

    def gold_answer(self, item: EvalItem) -> str | None:
        """The target points in the format the prompt asks for (Molmo's, percent of width/height, 1 decimal)."""
        return molmo_point_answer(item)


def molmo_point_answer(item: EvalItem) -> str:
    """An item's ground-truth points as a Molmo point reply: `<point ...>`, `<points ...>` or "There are none."."""
    from PIL import Image

    w, h = Image.open(_io.BytesIO(item.images[0])).size
    pts = [(x / w * 100, y / h * 100) for x, y in item.target.get("points") or []]
    q = item.question
    if not pts:
        return "There are none."
    if len(pts) == 1:
        return f'<point x="{pts[0][0]:.1f}" y="{pts[0][1]:.1f}" alt="{q}">{q}</point>'
    attrs = " ".join(f'x{i}="{x:.1f}" y{i}="{y:.1f}"' for i, (x, y) in enumerate(pts, 1))
    return f'<points {attrs} alt="{q}">{q}</points>'


def builtin_benchmarks() -> list[Benchmark]:
    """One instance of each built-in benchmark (`core.evals.registry` registers them)."""
    return [CountBench(), DocVQA(), ChartQA(), RealWorldQA(), PixMoPoints()]
