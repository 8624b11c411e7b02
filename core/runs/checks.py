"""Cheap input checks that run before any heavy step: paths exist, the source has a record, the eval cache
holds the requested benchmarks, numbers are in range. Every problem is collected and reported at once, each
naming the input and what it accepts."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


class InputError(ValueError):
    """Bad workflow inputs; the message lists every problem found."""


@dataclass
class Problems:
    """Collects input problems; `raise_if_any` raises one InputError listing them all."""

    what: str
    items: list[str] = field(default_factory=list)

    def add(self, name: str, message: str) -> None:
        self.items.append(f"--{name}: {message}")

    def check(self, ok: bool, name: str, message: str) -> bool:
        if not ok:
            self.add(name, message)
        return ok

    def raise_if_any(self) -> None:
        if self.items:
            raise InputError(f"{self.what}: {len(self.items)} bad input(s)\n  " + "\n  ".join(self.items))


def in_range(p: Problems, name: str, value: float, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False, hi_open: bool = False) -> bool:
    """Check lo <= value <= hi (open ends with lo_open / hi_open); the message states the valid range."""
    ok = isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "-inf" if lo is None else f"{lo}"
        right = "inf" if hi is None else f"{hi}"
        rng = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        p.add(name, f"{value!r} is out of range; valid: {rng}")
    return ok


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def check_dir(p: Problems, name: str, url: str) -> bool:
    """The folder exists (path or fsspec URL)."""
    if not p.check(bool(url), name, "is required (a folder path or URL)"):
        return False
    try:
        fs, path = _fs(url)
        return p.check(fs.isdir(path), name, f"{url!r} is not an existing folder")
    except Exception as e:  # an unreachable store is a bad input too; say why
        p.add(name, f"{url!r} cannot be opened: {type(e).__name__}: {e}")
        return False


def first_record(url: str, format: str = "auto") -> object:
    """The first record of a source (any container/dialect of core.io.sources), reading only as far as it."""
    from core.io.sources import iter_source

    for r in iter_source(url, format):
        return r.record if r.record is not None else r.problem
    raise ValueError("no record (no data file, an empty file, or an empty JSON array)")


def check_format(p: Problems, name: str, spec: str) -> bool:
    """An ingest format spec: auto, a container, a dialect, or container:dialect."""
    from core.io.sources import CONTAINERS, DIALECTS, parse_format

    try:
        parse_format(spec)
        return True
    except ValueError:
        p.add(name, f"{spec!r} is not a format; valid: auto, {'|'.join(CONTAINERS)}, {'|'.join(DIALECTS)}, "
                    "or container:dialect (e.g. jsonl:messages)")
        return False


def inline_images(url: str, format: str = "auto") -> bool:
    """Whether every file of the source carries its images inline (WebDataset, Parquet): no image_root needed."""
    from core.io.sources import detect_container, list_source_files, parse_format

    container = parse_format(format)[0]
    files = list_source_files(url)
    return bool(files) and all((container if container != "auto" else detect_container(f)) in ("wds", "parquet")
                               for f in files)


def check_source(p: Problems, name: str, url: str, format: str = "auto") -> bool:
    """The source (file, folder or glob of JSON/JSONL/WebDataset/Parquet files) exists and holds a record."""
    if not p.check(bool(url), name, "is required (JSON/JSONL/WebDataset/Parquet: file, folder or glob; path or URL)"):
        return False
    try:
        from core.io.sources import list_source_files

        files = list_source_files(url)
        if not p.check(bool(files), name, f"{url!r} holds no data file (.json, .jsonl, .tar, .parquet)"):
            return False
        first_record(url, format)
        return True
    except FileNotFoundError:
        p.add(name, f"{url!r} is not an existing file, folder or glob")
        return False
    except Exception as e:
        p.add(name, f"{url!r} has no readable record: {type(e).__name__}: {e}")
        return False


def check_data(p: Problems, source: str, image_root: str, format: str) -> None:
    """`--format` parses; the source exists and has a record; image_root exists (optional when every source
    file carries its images inline: WebDataset, Parquet)."""
    if not check_format(p, "format", format):
        return
    if check_source(p, "source", source, format) and not image_root and inline_images(source, format):
        return
    check_dir(p, "image_root", image_root)


def check_id_list(p: Problems, name: str, path: str | None) -> bool:
    """An optional id list file (JSON list, {"ids": [...]}, or one id per line) that holds at least one id."""
    if path is None:
        return True
    from core.runs.summary import load_id_list

    try:
        return p.check(bool(load_id_list(path)), name, f"{path!r} holds no id")
    except Exception as e:
        p.add(name, f"{path!r} is not a readable id list (JSON list, {{\"ids\": [...]}}, or one id per line): "
                    f"{type(e).__name__}: {e}")
        return False


def check_benchmarks(p: Problems, name: str, benchmarks: Iterable[str], eval_cache: str,
                     cache_name: str = "eval_cache") -> bool:
    """Known benchmark names, each with a non-empty folder `<eval_cache>/<benchmark>`."""
    from core.evals.registry import benchmark_names

    known = benchmark_names()
    benchmarks = list(benchmarks)
    ok = p.check(bool(benchmarks), name, f"needs at least one benchmark of {known}")
    unknown = [b for b in benchmarks if b not in known]
    ok &= p.check(not unknown, name, f"unknown benchmark(s) {unknown}; valid: {known}")
    if not check_dir(p, cache_name, eval_cache):
        return False
    fs, root = _fs(eval_cache)
    missing = [b for b in benchmarks if b in known and not (fs.isdir(f"{root.rstrip('/')}/{b}")
                                                           and fs.ls(f"{root.rstrip('/')}/{b}"))]
    present = sorted(d.rsplit("/", 1)[-1] for d in fs.ls(root, detail=False) if fs.isdir(d))
    return p.check(not missing, cache_name,
                   f"{eval_cache!r} has no (or an empty) folder for {missing}; present: {present}") and ok


def check_config(p: Problems, name: str, cfg: object) -> bool:
    """Re-run a config dataclass's own validation (a launch plan default is not re-constructed)."""
    validate = getattr(cfg, "validate", None)
    if validate is None:
        return True
    try:
        validate()
        return True
    except ValueError as e:
        p.add(name, str(e))
        return False


def check_run_inputs(p: Problems, *, source: str, image_root: str, format: str, known_bad_ids: str | None,
                     shard_max_samples: int, semdedup_config: object, decontam_config: object,
                     reference_source: str, reference_image_root: str) -> None:
    """The inputs `curate` and `ablate` share: the data and its format, the known-bad id list, ingest shard
    size, the dedup/decontam configs and the optional trusted reference set."""
    check_data(p, source, image_root, format)
    check_id_list(p, "known_bad_ids", known_bad_ids)
    in_range(p, "shard_max_samples", shard_max_samples, lo=1)
    check_config(p, "semdedup_config", semdedup_config)
    check_config(p, "decontam_config", decontam_config)
    if reference_source:
        check_source(p, "reference_source", reference_source)
        check_dir(p, "reference_image_root", reference_image_root)
