"""Export: the curated set of a run as WebDataset shards in the training schema, with a manifest.

What is exported is decided by the ledgers only (no step is recomputed): the ids that passed the last
step of `steps`, or a named subset id list (a perplexity decile, a dedup target, ...). Rephrased
conversations, when given, replace the originals. Shards are written by `core.io.wds.ShardWriter` in input
order (sorted shards, position within a shard) with fixed tar metadata, so the same inputs always give
byte-identical shards and manifest. The exported count is checked against the ledger's kept count.

Layout of `out_dir`::

    shards/<kind>/<prefix>-000000.tar  training-schema shards (key.json + key.jpg / key.<i>.jpg), one folder per
                                       sample kind (`text`, `image`, `images<n>`): homogeneous shards, so every
                                       loader reads them (Hugging Face `datasets` needs one member layout per config)
    README.md                          dataset card in the Hub's form (one `datasets` config per kind, provenance)

Loader schema (docs/export.md): every single-image sample has its image under one fixed key (`jpg` by
default: `WebDataset(urls).decode("pil").to_tuple("jpg", "json")` works for every one of them), several
images are `key.0.jpg`, `key.1.jpg`, ..., and the `image` field of `key.json` names exactly those members.
`image_format` chooses the encoding: `jpg` (default; JPEG sources are copied byte for byte, other formats
re-encoded at quality 95), `png` (lossless; PNG sources copied, others re-encoded), `keep` (source bytes and
their own extension: jpg, png, webp ...).
    manifest.json                      ids, counts, bytes, sha256 per shard; what each step removed
    ledger/export/part-export.parquet  one row per exported (or unexpectedly unreadable) sample

Partitioned (`ExportConfig.partition_shards` = k > 0, docs/export.md): units of k consecutive input shards run
through `core.runs.fanout.run_fanout` (`export_plan` gives the StepSpec and units); unit `u<i>` writes
`shards/<kind>/<prefix>-u<i>-NNNNNN.tar`, `parts/u<i>.json` and `ledger/export/part-u<i>.parquet`; the reduce
(`PartitionedExportStep.finish`) merges the parts into `manifest.json` and writes the card. Same samples and
decisions as one unit; other shard boundaries.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from core.foundation.configs import ConfigJSON, check_ranges, register_preset
from core.foundation.ids import load_id_list  # noqa: F401  (the one id-list loader; re-exported for tasks/export.py)
from core.foundation.ledger import LedgerWriter, check_balance, find_step_dir, read_ledger
from core.foundation.log import progress
from core.foundation.outputs import folder_lock, fresh_dir, swap_in, temp_path, write_atomic, write_json_atomic
from core.foundation.sample import Sample, SampleError
from core.foundation.step import Passing, ShardStep, Unit
from core.io.images import decode_image, sniff_format
from core.io.wds import ShardWriter, export_manifest, export_shards, image_member_names, iter_samples, shard_name
from core.runs.fanout import FanOut, StepSpec, run_fanout, tiny_fanout
from core.steps.export_card import dataset_card

log = logging.getLogger(__name__)
STEP = "export"
MANIFEST = "manifest.json"
CARD = "README.md"
REPHRASE_COLUMNS = ("sample_id", "conversations_json")
IMAGE_FORMATS = ("jpg", "png", "keep")
JPEG_QUALITY = 95  # re-encoded JPEGs: quality 95, 4:4:4 chroma (no subsampling), baseline, no EXIF


class ExportError(RuntimeError):
    """The export does not match the ledgers (a kept sample is missing or unreadable)."""


@dataclass
class ExportConfig(ConfigJSON):
    """How to export a run (the `export_config` of a run; `steps` and `subset_name` are set per call by the task).

    `steps` are the ledger steps in pipeline order (the last one decides what is kept); None infers the
    order from the ledgers (steps sorted by how many samples they decided, then validated by
    `check_balance`). `subset_name` names a subset export in the manifest. `image_format` is the image
    encoding of the shards: "jpg" (default, one fixed `jpg` key for every single-image sample), "png"
    (lossless, fixed `png` key) or "keep" (source bytes, key = source format).

    `max_samples` / `max_bytes` bound each output shard. `partition_shards` = k > 0 exports in units of k
    consecutive input shards (docs/export.md "Partitioned export"): each unit writes its own output shards
    (`<prefix>-u<unit>-NNNNNN.tar`), ledger part and manifest part, a reduce merges the manifest parts; 0 (default)
    is one unit over all input shards. `fanout` (core/runs/fanout.py `FanOut`) spreads the units over workers: a
    scheduling field (SCHEDULING_FIELDS), left out of the stamp and the manifest, so 1 or N workers give the same
    bytes; used only when `partition_shards` > 0.
    """

    steps: list[str] | None = None
    max_samples: int = 1000
    max_bytes: int = 256 << 20
    prefix: str = "shard"
    subset_name: str = ""
    verify_images: bool = False  # ingest already decoded every image; re-decode only when asked
    image_format: str = "jpg"
    partition_shards: int = 0
    fanout: FanOut = field(default_factory=tiny_fanout)

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if isinstance(self.fanout, dict):  # a JSON config (`--export_config '{"fanout": {"workers": 2}}'`)
            self.fanout = FanOut(**self.fanout)
        check_ranges(self, {"max_samples": (1, None), "max_bytes": (1, None), "partition_shards": (0, None)})


def manifest_config(cfg: ExportConfig) -> dict[str, Any]:
    """The config as the manifest and the dataset card record it: what the export's bytes depend on. `fanout`
    (where and how fast it runs) is left out, and `partition_shards` when 0 (the one-unit export's manifest is
    byte-identical to the one written before partitions existed)."""
    out = asdict(cfg)
    out.pop("fanout", None)
    if not cfg.partition_shards:
        out.pop("partition_shards", None)
    return out


@register_preset(ExportConfig, "default", default=True)
def default_export_config() -> ExportConfig:
    """1,000-sample shards of at most 256 MiB, JPEG images (the loader schema's fixed `jpg` key)."""
    return ExportConfig()


# ---- ledgers --------------------------------------------------------------------------------------
def _run_dirs(run_dir: str | Sequence[str]) -> list[str]:
    return [str(run_dir)] if isinstance(run_dir, (str, os.PathLike)) else [str(d) for d in run_dir]


def ledger_steps(run_dir: str | Sequence[str]) -> list[str]:
    """Step names that have a ledger in the run dir(s), in pipeline order (most decisions first)."""
    sizes: dict[str, int] = {}
    for d in _run_dirs(run_dir):
        root = Path(d) / "ledger"
        for sd in sorted(root.iterdir()) if root.is_dir() else []:
            if sd.is_dir() and sd.name != STEP and sd.name not in sizes and any(sd.rglob("*.parquet")):
                sizes[sd.name] = len(read_ledger(sd))
    return sorted(sizes, key=lambda s: (-sizes[s], s))


def removal_summary(run_dir: str | Sequence[str], steps: Sequence[str]) -> list[dict[str, Any]]:
    """Per step: inputs, kept, modified, and the drop/quarantine counts by reason (from the ledgers)."""
    out = []
    for step in steps:
        df = read_ledger(find_step_dir(_run_dirs(run_dir), step))
        removed = df[df["decision"].isin(["drop", "quarantine"])]
        by_reason = removed.groupby(["decision", "reason"]).size()
        out.append({
            "step": step,
            "inputs": int(len(df)),
            "kept": int((df["decision"] == "keep").sum()),
            "modified": int((df["decision"] == "modify").sum()),
            "removed": int(len(removed)),
            "by_reason": [{"decision": d, "reason": r, "count": int(c)} for (d, r), c in sorted(by_reason.items())],
        })
    return out


def load_rephrased(rephrased_dir: str, ids: set[str]) -> dict[str, str]:
    """`sample_id -> conversations_json` for the wanted ids, from every Parquet file under `rephrased_dir`.

    Contract with the rephrase step: Parquet files with columns `sample_id` (str) and
    `conversations_json` (the new LLaVA `conversations` list as JSON).
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    fs, root = fsspec.core.url_to_fs(rephrased_dir)
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {rephrased_dir}")
    ds = pds.dataset(files, filesystem=fs, format="parquet")
    missing = [c for c in REPHRASE_COLUMNS if c not in ds.schema.names]
    if missing:
        raise ValueError(f"rephrased Parquet under {rephrased_dir} lacks columns {missing}")
    if not ids:  # nothing to export (an empty run): an empty id list has no Arrow type to filter with
        return {}
    table = ds.to_table(columns=list(REPHRASE_COLUMNS), filter=pc.field("sample_id").isin(list(ids)))
    out: dict[str, str] = {}
    for sid, conv in zip(table.column("sample_id").to_pylist(), table.column("conversations_json").to_pylist()):
        out[str(sid)] = conv  # a later file wins: rephrase re-runs append, never edit
    return out


def _apply_rephrase(s: Sample, conv_json: str) -> Sample:
    """The sample with its conversation replaced; SampleError when the new one is not a valid record
    for the same images (placeholders lost, roles broken, ...)."""
    try:
        conv = json.loads(conv_json)
    except (TypeError, json.JSONDecodeError) as e:
        raise SampleError("invalid_json", f"rephrased conversations: {e}") from None
    rec = s.to_record()
    rec["conversations"] = conv
    new = Sample.from_record(rec)
    new.image_bytes, new.shard = s.image_bytes, s.shard
    return new


# ---- loader schema ---------------------------------------------------------------------------------
def encode_for_loader(data: bytes, image_format: str) -> bytes:
    """The image bytes in the export's format: unchanged when already in it (or for "keep"), else decoded
    (RGB, `core.io.images.decode_image`: corrupt data raises SampleError) and re-encoded deterministically
    (Pillow: same pixels and library version give the same bytes)."""
    if image_format == "keep" or sniff_format(data) == {"jpg": "JPEG", "png": "PNG"}[image_format]:
        return data
    im = decode_image(data)
    buf = io.BytesIO()
    if image_format == "jpg":
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def to_loader_schema(s: Sample, image_format: str) -> Sample:
    """The sample as it is exported: images in `image_format` and the record's `image` names equal to the
    tar member names (`key.jpg`, or `key.0.jpg`, `key.1.jpg` ...), so a loader finds each image by the
    name its JSON gives."""
    if not s.images:
        return s
    s.image_bytes = [encode_for_loader(b, image_format) for b in s.image_bytes]
    s.images = image_member_names(s)
    return s


# ---- export ---------------------------------------------------------------------------------------
def sample_kind(s: Sample) -> str:
    """The export shard folder of a sample in loader schema: `text`, `image` or `images<n>`, plus
    `-<ext>[-<ext>...]` when the members' extensions vary (image_format=keep). Every sample of one kind has
    the same tar member suffixes, which is what Hugging Face `datasets`' WebDataset builder requires of a
    config (it infers the features from the first examples and refuses an archive whose samples differ)."""
    if not s.images:
        return "text"
    base = "image" if len(s.images) == 1 else f"images{len(s.images)}"
    exts = sorted({name.rsplit(".", 1)[-1] for name in s.images})
    return base if exts in (["jpg"], ["png"]) else f"{base}-{'-'.join(exts)}"


@dataclass
class _Written:
    shards: list[tuple[str, Any]]  # (kind, ShardInfo) in kind order, then write order
    n: int
    n_rephrased: int
    fallbacks: dict[str, int]


class ExportStep(ShardStep):
    """The export on the shard-step contract: one unit (the whole run, named `export`), one ledger part
    `ledger/export/part-export.parquet`, the wanted ids as `prev` (missing ones quarantined by the base's
    `finish`); `export_curated` runs it with the base's `run` in a fresh folder.

    One unit because output shards are size-bounded and numbered across the input shards: an input shard
    is no unit of work, so an unfinished export is rewritten whole. A finished one is recognised by
    `finished_export` (its manifest, card, ledger part and a stamp of this config and code). The partitioned
    export (`PartitionedExportStep`, `partition_shards` > 0) makes groups of input shards the units instead."""

    name = STEP

    def __init__(self, ledger_root: str | os.PathLike, wanted: Passing, cfg: ExportConfig, out: str,
                 shard_urls: Sequence[str], rephrased: dict[str, str]):
        super().__init__(ledger_root, wanted)
        self.cfg, self.dest, self.shard_urls, self.rephrased = cfg, out, shard_urls, rephrased
        self.written: _Written | None = None

    def unit_name(self, url: str) -> str:
        return STEP

    def finish(self, n_units: int) -> int:
        """Ids wanted but not exported are looked for only when the count differs (reading the export's
        ledger back is skipped for a complete export)."""
        if self.written is not None and self.written.n == len(self.prev or ()):
            return 0
        return super().finish(n_units)

    def process(self, unit: Unit, led: LedgerWriter) -> _Written:
        samples = iter_samples(self.shard_urls, quarantine=led, include_ids=self.include, expected=False,
                               verify_images=self.cfg.verify_images)  # ids in no shard: `finish` (the base)
        self.written = self.export_samples(samples, led, self.cfg.prefix, len(self.prev or ()))
        return self.written

    def export_samples(self, samples: Iterable[Sample], led: LedgerWriter, prefix: str, total: int | None,
                       desc: str = "export") -> _Written:
        """Write `samples` (in order) as loader-schema shards `shards/<kind>/<prefix>-NNNNNN.tar`, one ledger row
        each into `led`: the per-sample work of an export unit, the same for one unit or a partition."""
        t0 = time.time()
        cfg, rephrased = self.cfg, self.rephrased
        writers: dict[str, ShardWriter] = {}  # one per sample kind: shards/<kind>/<prefix>-000000.tar ...
        fallbacks: dict[str, int] = {}
        n_rephrased = n = 0
        for s in progress(samples, desc=desc, total=total, unit="sample"):
            reason = ""
            try:
                s = to_loader_schema(s, cfg.image_format)
            except SampleError as e:  # an image that does not decode: quarantined, the count check then fails
                led.add(s.id, "quarantine", e.reason, detail=e.detail, shard=s.shard)
                continue
            if s.id in rephrased:
                try:
                    s = _apply_rephrase(s, rephrased[s.id])
                    n_rephrased += 1
                except SampleError as e:
                    reason = f"rephrase_invalid:{e.reason}"
                    fallbacks[reason] = fallbacks.get(reason, 0) + 1
                    log.warning("sample %s: rephrase rejected (%s); exporting the original text", s.id, e)
            kind = sample_kind(s)
            if kind not in writers:
                writers[kind] = ShardWriter(f"{self.dest}/shards/{kind}", prefix, cfg.max_samples, cfg.max_bytes)
            shard = f"{kind}/{writers[kind].write(s)}"
            led.add(s.id, "keep", reason, shard=shard, rephrased=s.id in rephrased and not reason)
            n += 1
            if n % 10_000 == 0:
                log.info("%s: %d/%s samples, %.0f samples/s", desc, n, total or "?", n / (time.time() - t0))
        shards = [(kind, info) for kind in sorted(writers) for info in writers[kind].close()]
        self.written = _Written(shards, n, n_rephrased, fallbacks)
        return self.written


# ---- partitioned export: units of `partition_shards` input shards, the manifest as a reduce ----------------
PARTS = "parts"  # parts/<unit>.json: one unit's manifest part (its shards with ids, counts, bytes, sha256)
_SHARDS_SLOT = "\x00shards\x00"  # where the streamed shard list goes in the manifest's JSON text


def export_units(shard_urls: Sequence[str], partition_shards: int) -> list[str]:
    """The unit URLs of a partitioned export: the first input shard of each group of `partition_shards`
    consecutive input shards (input order). Unit i is named `u<i:06d>`."""
    return [shard_urls[i] for i in range(0, len(shard_urls), partition_shards)]


class PartitionedExportStep(ExportStep):
    """The export in units of `cfg.partition_shards` consecutive input shards (`export_units`), in the folder `out`
    itself (no staging swap: finished units survive a kill and are skipped on re-run).

    Unit `u<i>` writes `shards/<kind>/<prefix>-u<i>-NNNNNN.tar` (every file name carries its unit, so no two
    writers share one), then `parts/u<i>.json` (its manifest part), then its ledger part `part-u<i>.parquet`
    (published last by the base: the completion record). A unit redone after a kill first removes what its
    killed attempt left. `finish` (the driver, once) is the reduce: the missing-id accounting of the base when
    the counts do not add up, the count check (ExportError), then `manifest.json` merged from the parts in unit
    order (streamed: one part in memory at a time) and the dataset card from the merged counts.

    `head` holds the manifest fields that come from the ledgers (`_Selection.head`)."""

    def __init__(self, ledger_root: str | os.PathLike, wanted: Passing, cfg: ExportConfig, out: str,
                 shard_urls: Sequence[str], rephrased: dict[str, str], head: dict[str, Any],
                 code_version: str = "", source: str = ""):
        super().__init__(ledger_root, wanted, cfg, out, shard_urls, rephrased)
        if cfg.partition_shards < 1:
            raise ValueError("PartitionedExportStep needs cfg.partition_shards >= 1")
        self.head, self.code_version, self.source = head, code_version, source
        k = cfg.partition_shards
        self.groups = {shard_urls[i]: (f"u{i // k:06d}", list(shard_urls[i:i + k]))
                       for i in range(0, len(shard_urls), k)}

    @property
    def parts_dir(self) -> Path:
        return Path(self.dest) / PARTS

    def unit_name(self, url: str) -> str:
        if url not in self.groups:
            raise ValueError(f"export: {url} starts no unit of {self.cfg.partition_shards} shards (`export_units`)")
        return self.groups[url][0]

    def done(self, unit: Unit) -> bool:
        return self.is_done(unit.name) and (self.parts_dir / f"{unit.name}.json").is_file()

    def _prefix(self, unit_name: str) -> str:
        return f"{self.cfg.prefix}-{unit_name}"

    def _clear_unit(self, unit_name: str) -> None:
        """Remove what a killed attempt of the unit left (shards, their temp files, its manifest part)."""
        root, pre = Path(self.dest) / "shards", self._prefix(unit_name)
        for p in [*root.glob(f"*/{pre}-*.tar"), *root.glob(f"*/.{pre}-*.tmp"), self.parts_dir / f"{unit_name}.json"]:
            p.unlink(missing_ok=True)

    def clear_outputs(self) -> None:
        """A recompute (another config or code) removes every unit's outputs, the manifest and the card."""
        super().clear_outputs()
        for sub in ("shards", PARTS):
            shutil.rmtree(Path(self.dest) / sub, ignore_errors=True)
        for f in (MANIFEST, CARD):
            (Path(self.dest) / f).unlink(missing_ok=True)

    def process(self, unit: Unit, led: LedgerWriter) -> dict[str, int]:
        _, group = self.groups[unit.url]
        self._clear_unit(unit.name)
        total = sum(len(self.prev.by_shard.get(shard_name(u), ())) for u in group) if self.prev else 0
        samples = iter_samples(group, quarantine=led, include_ids=self.include, expected=False,
                               verify_images=self.cfg.verify_images)
        w = self.export_samples(samples, led, self._prefix(unit.name), total or None, desc=f"export {unit.name}")
        part = {"unit": unit.name, "inputs": [shard_name(u) for u in group], "n_samples": w.n,
                "n_rephrased": w.n_rephrased, "rephrase_fallbacks": dict(sorted(w.fallbacks.items())),
                "reasons": dict(sorted(led.reasons.items())), "shards": [_shard_entry(k, i) for k, i in w.shards]}
        write_json_atomic(part, self.parts_dir / f"{unit.name}.json", indent=1, sort_keys=True)
        self.written = None  # the unit's shard list lives in its part; nothing per sample stays in memory
        return {"n_samples": w.n, "n_shards": len(w.shards)}

    def unit_names(self) -> list[str]:
        return [name for name, _ in self.groups.values()]

    def _drop_other_units(self) -> None:
        """Remove the outputs of units that are not units of this export (a folder reused with another input
        list): their ledger parts would count as decisions, their shards would sit beside the manifest."""
        mine = set(self.unit_names())
        dest = Path(self.dest)
        pre = re.escape(self.cfg.prefix)
        found = [(m.group(1), p) for p in (dest / "shards").glob("*/*.tar")
                 if (m := re.fullmatch(rf"{pre}-(u\d{{6}})-\d{{6}}\.tar", p.name))]
        found += [(p.stem, p) for p in self.parts_dir.glob("u*.json")]
        found += [(p.stem.removeprefix("part-"), p) for p in self.ledger_dir.glob("part-u*.parquet")]
        for unit, p in found:
            if unit not in mine:
                log.warning("export: removing %s (unit %s is not a unit of this export)", p, unit)
                p.unlink(missing_ok=True)

    def finish(self, n_units: int) -> int:
        self._drop_other_units()
        stats = merge_parts(self.parts_dir, self.unit_names())
        want = len(self.prev or ())
        missing = 0
        if n_units == 0 or stats["n_samples"] != want:  # the base: the empty part, ids that no unit decided
            missing = ShardStep.finish(self, n_units)
        if stats["n_samples"] != want:
            quarantined = {r: c for r, c in stats["reasons"].items() if r not in stats["rephrase_fallbacks"]}
            if missing:
                quarantined[self.missing_reason] = quarantined.get(self.missing_reason, 0) + missing
            raise ExportError(
                f"exported {stats['n_samples']} samples but the ledger keeps {want}: unreadable or missing "
                f"{quarantined} (see {self.dest}/ledger/{STEP})")
        manifest = partitioned_manifest(self.head, self.cfg, stats)
        write_atomic(Path(self.dest) / CARD, dataset_card(manifest, code_version=self.code_version,
                                                          source=self.source))
        _write_merged_manifest(manifest, self.parts_dir, self.unit_names(), Path(self.dest) / MANIFEST)
        return missing


def _shard_entry(kind: str, info: Any) -> dict[str, Any]:
    """A shard's manifest record (the same in the one-unit and the partitioned manifest)."""
    return {"name": f"{kind}/{Path(info.path).name}", "kind": kind, "n_samples": info.n_samples,
            "n_bytes": info.n_bytes, "sha256": info.sha256, "ids": info.ids}


def _read_part(parts_dir: Path, name: str) -> dict[str, Any]:
    with open(parts_dir / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def merge_parts(parts_dir: str | os.PathLike, unit_names: Sequence[str]) -> dict[str, Any]:
    """The reduce of a partitioned export's manifest parts, in unit order: sample, byte, shard and rephrase
    counts, ledger reasons, per-kind counts, and the shard records without their `ids` (kind order, then unit
    order, then write order). One part in memory at a time: memory grows with the number of output shards,
    never with the number of samples."""
    parts_dir = Path(parts_dir)
    n = n_bytes = n_rephrased = 0
    fallbacks: dict[str, int] = {}
    reasons: dict[str, int] = {}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for name in unit_names:
        part = _read_part(parts_dir, name)
        n += part["n_samples"]
        n_rephrased += part["n_rephrased"]
        for src, into in ((part["rephrase_fallbacks"], fallbacks), (part["reasons"], reasons)):
            for k, v in src.items():
                into[k] = into.get(k, 0) + v
        for sh in part["shards"]:
            n_bytes += sh["n_bytes"]
            by_kind.setdefault(sh["kind"], []).append({k: v for k, v in sh.items() if k != "ids"})
    shards = [sh for kind in sorted(by_kind) for sh in by_kind[kind]]
    return {"n_samples": n, "n_bytes": n_bytes, "n_shards": len(shards), "n_rephrased": n_rephrased,
            "rephrase_fallbacks": dict(sorted(fallbacks.items())), "reasons": dict(sorted(reasons.items())),
            "n_units": len(unit_names),
            "kinds": {k: {"n_samples": sum(s["n_samples"] for s in v), "n_shards": len(v)}
                      for k, v in sorted(by_kind.items())},
            "shards": shards}


def partitioned_manifest(head: dict[str, Any], cfg: ExportConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a partitioned export from the ledgers' `head` and the merged parts (`merge_parts`); its
    shard records lack `ids` (`manifest.json` on disk has them)."""
    return {**head, **{k: v for k, v in stats.items() if k != "reasons"}, "config": manifest_config(cfg),
            "loader_schema": _loader_schema(cfg)}


def _write_merged_manifest(manifest: dict[str, Any], parts_dir: Path, unit_names: Sequence[str], path: Path) -> None:
    """Write `manifest` as `json.dumps(..., indent=1, sort_keys=True)` would, its shard records (with ids) streamed
    from the parts: one pass over the parts appends each record to a per-kind temp file, then the kinds are
    concatenated in order into the manifest's temp file, renamed over `path` (atomic, as `write_json_atomic`)."""
    head, _, tail = json.dumps({**manifest, "shards": _SHARDS_SLOT}, indent=1, sort_keys=True).partition(
        json.dumps(_SHARDS_SLOT))
    tmp = temp_path(path)
    with tempfile.TemporaryDirectory(prefix=".manifest-", dir=path.parent) as scratch:
        files: dict[str, Any] = {}
        try:
            for name in unit_names:
                for sh in _read_part(parts_dir, name)["shards"]:
                    if sh["kind"] not in files:
                        files[sh["kind"]] = open(os.path.join(scratch, f"{len(files)}.json"), "w", encoding="utf-8")
                    text = json.dumps(sh, indent=1, sort_keys=True).replace("\n", "\n  ")
                    files[sh["kind"]].write(",\n  " + text)
        finally:
            for f in files.values():
                f.close()
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(head)
            if not files:
                out.write("[]")
            else:
                out.write("[")
                first = True
                for kind in sorted(files):
                    with open(files[kind].name, encoding="utf-8") as f:
                        if first:
                            f.read(1)  # the first record: no comma before it
                            first = False
                        shutil.copyfileobj(f, out)
                out.write("\n ]")
            out.write(tail)
    os.replace(tmp, path)


@dataclass
class _Selection:
    """What an export takes, read from the ledgers once by the driver (`_select`)."""

    dirs: list[str]
    steps: list[str]
    balance: list[Any]
    kept: Passing
    wanted: Passing
    outside: int
    rephrased: dict[str, str]
    subset: bool

    def head(self, cfg: ExportConfig) -> dict[str, Any]:
        """The manifest fields that come from the ledgers, not from the written shards."""
        return {
            "format": 2,  # 2: shards/<kind>/ folders, shard names relative to shards/
            "subset": cfg.subset_name if self.subset else "",
            "selection": "subset" if self.subset else f"kept_by:{self.steps[-1]}",
            "steps": self.steps,
            "subset_outside_kept": self.outside,
            "n_kept_by_last_step": len(self.kept.ids),
            "balance": [b.as_dict() for b in self.balance],
            "removed_by_step": removal_summary(self.dirs, self.steps),
        }


def _select(shard_urls: Sequence[str], run_dir: str | Sequence[str], cfg: ExportConfig,
            subset_ids: Iterable[str] | None, rephrased_dir: str | None) -> _Selection:
    """The ledgers' verdict: steps in order (balanced), the last step's kept ids, the wanted ids (kept, or the
    subset), the rephrased conversations of the wanted ids."""
    dirs = _run_dirs(run_dir)
    steps = list(cfg.steps) if cfg.steps else ledger_steps(dirs)
    if not steps:
        raise ExportError(f"no step ledgers under {dirs}")
    balance = check_balance(dirs, steps)
    kept = Passing.read(dirs, steps[-1])
    assert kept is not None
    if subset_ids is not None:
        wanted = Passing.of(subset_ids, "subset")
        outside = len(wanted.ids - kept.ids)
        if outside:
            log.warning("subset %r: %d ids did not pass step %s", cfg.subset_name, outside, steps[-1])
    else:
        wanted, outside = kept, 0
    rephrased = load_rephrased(rephrased_dir, set(wanted.ids)) if rephrased_dir else {}
    log.info("export: %d samples wanted (%s), %d rephrased, from %d shards", len(wanted),
             f"subset {cfg.subset_name!r}" if subset_ids is not None else f"kept by {steps[-1]}",
             len(rephrased), len(shard_urls))
    return _Selection(dirs, steps, balance, kept, wanted, outside, rephrased, subset_ids is not None)


def _loader_schema(cfg: ExportConfig) -> dict[str, Any]:
    return {"image_format": cfg.image_format,
            "single_image_key": None if cfg.image_format == "keep" else cfg.image_format,
            "multi_image_keys": "<i>." + ("<ext>" if cfg.image_format == "keep" else cfg.image_format),
            "json_image_names": "tar member names"}


def export_curated(
    shard_urls: Iterable[str],
    run_dir: str | Sequence[str],
    out_dir: str,
    cfg: ExportConfig,
    subset_ids: Iterable[str] | None = None,
    rephrased_dir: str | None = None,
    code_version: str = "",
    source: str = "",
    resume: bool = False,
) -> dict[str, Any]:
    """Write the curated samples of a run as training-schema WDS shards and return the manifest.

    :param shard_urls: the ingested shards (sorted; `core.io.wds.list_shards(run/shards)`).
    :param run_dir: run directory, or the step output directories, holding `ledger/<step>/`.
    :param out_dir: receives `shards/`, `manifest.json` and `ledger/export/`.
    :param cfg: ExportConfig.
    :param subset_ids: export exactly these ids instead of the last step's kept ids.
    :param rephrased_dir: Parquet files (sample_id, conversations_json) whose conversations replace the
        originals; an invalid rephrase keeps the original text (ledger reason `rephrase_invalid:<why>`).
    :param code_version: recorded in the dataset card (the task passes its cache version).
    :param source: where the data came from, recorded in the dataset card.
    :param resume: return the manifest of the export already in `out_dir` when it is finished and was made
        with this config and code (`finished_export`) instead of writing it again; for a caller whose
        `out_dir` is keyed by these inputs (tasks/export.py: a Flyte retry after the export finished).
    :raises ExportError: when the number of exported samples differs from the kept (or subset) count.
    """
    t0 = time.time()
    if resume and (done := finished_export(out_dir, cfg)) is not None:
        log.info("export: %s already holds this export (same config and code), kept", out_dir)
        return done
    shard_urls = list(shard_urls)
    sel = _select(shard_urls, run_dir, cfg, subset_ids, rephrased_dir)
    if cfg.partition_shards:
        return _export_partitioned(shard_urls, sel, out_dir, cfg, code_version, source, resume, t0)
    dirs, steps, balance, kept_set = sel.dirs, sel.steps, sel.balance, sel.kept.ids
    wanted, outside, rephrased = sel.wanted, sel.outside, sel.rephrased

    out = out_dir.rstrip("/")
    remote = _is_remote(out)
    with _fresh_export(out) as build:  # local: a fresh sibling folder swapped in whole at the end
        # the ledger is a local Parquet file; for a remote out_dir it is written locally and uploaded
        led_root = tempfile.mkdtemp(prefix="export-ledger-") if remote else build
        step = ExportStep(led_root, wanted, cfg, build, shard_urls, rephrased)
        done = step.run([build])  # a fresh folder: the stamp records the export's config and code version
        w = done.results[STEP]
        quarantined = {r: c for r, c in done.reasons.items() if r not in w.fallbacks}
        if done.missing:  # some wanted id was in no shard (unreadable ones are quarantined by `process`)
            quarantined[step.missing_reason] = done.missing
        if remote:
            fs, root = fsspec.core.url_to_fs(out)
            for p in sorted(step.ledger_dir.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    fs.put_file(str(p), f"{root}/ledger/{STEP}/{p.name}")
            shutil.rmtree(led_root, ignore_errors=True)
        if w.n != len(wanted):  # the failed export still replaces the old one (its ledger says why), unmixed
            raise ExportError(
                f"exported {w.n} samples but the ledger keeps {len(wanted)}: unreadable or missing {quarantined} "
                f"(see {out}/ledger/{STEP})"
            )
        shards, n = w.shards, w.n
        manifest = {
            "format": 2,  # 2: shards/<kind>/ folders, shard names relative to shards/
            "subset": cfg.subset_name if subset_ids is not None else "",
            "selection": "subset" if subset_ids is not None else f"kept_by:{steps[-1]}",
            "steps": steps,
            "n_samples": n,
            "n_bytes": sum(s.n_bytes for _, s in shards),
            "n_shards": len(shards),
            "n_rephrased": w.n_rephrased,
            "rephrase_fallbacks": dict(sorted(w.fallbacks.items())),
            "subset_outside_kept": outside,
            "n_kept_by_last_step": len(kept_set),
            "balance": [b.as_dict() for b in balance],
            "removed_by_step": removal_summary(dirs, steps),
            "kinds": {k: {"n_samples": sum(s.n_samples for kk, s in shards if kk == k),
                          "n_shards": sum(1 for kk, _ in shards if kk == k)} for k in sorted({k for k, _ in shards})},
            "shards": [{"name": f"{k}/{Path(s.path).name}", "kind": k, "n_samples": s.n_samples,
                        "n_bytes": s.n_bytes, "sha256": s.sha256, "ids": s.ids} for k, s in shards],
            "config": manifest_config(cfg),
            "loader_schema": {"image_format": cfg.image_format,
                              "single_image_key": None if cfg.image_format == "keep" else cfg.image_format,
                              "multi_image_keys": "<i>." + ("<ext>" if cfg.image_format == "keep"
                                                             else cfg.image_format),
                              "json_image_names": "tar member names"},
        }
        write_json_atomic(manifest, f"{build}/{MANIFEST}", indent=1, sort_keys=True)
        write_atomic(f"{build}/{CARD}", dataset_card(manifest, code_version=code_version, source=source))
    log.info("export done: %d samples in %d shards, %.1f MB, %.1f s", n, len(shards),
             manifest["n_bytes"] / 1e6, time.time() - t0)
    return manifest


def export_plan(shard_urls: Sequence[str], run_dir: str | Sequence[str], out_dir: str, cfg: ExportConfig,
                subset_ids: Iterable[str] | None = None, rephrased_dir: str | None = None, code_version: str = "",
                source: str = "", on_mismatch: str | None = None,
                selection: _Selection | None = None) -> tuple[StepSpec, list[str]]:
    """The partitioned export (`cfg.partition_shards` > 0) as a fan-out: `(spec, units)` for
    `core.runs.fanout.run_fanout(spec, units, cfg.fanout)`, which runs the units (in-process or on Ray actors)
    and the reduce (`PartitionedExportStep.finish`: manifest and card) once on the driver. The ledgers are read
    here, once (`_select`); the step gets the wanted ids and the rephrased texts through the spec.

    `out_dir` must be a local folder (a task whose output is on object storage exports into its local mirror,
    tasks/paths.py `step_workdir`, which pushes each finished unit). `export_curated` wraps this with the
    folder's lock and its freshness rules; a direct caller owns `out_dir`."""
    if cfg.partition_shards < 1:
        raise ValueError("export_plan needs cfg.partition_shards >= 1 (0 is the one-unit export_curated)")
    if _is_remote(out_dir):
        raise ValueError(f"{out_dir}: a partitioned export writes a local folder (mirror it to object storage)")
    shard_urls = list(shard_urls)
    sel = selection or _select(shard_urls, run_dir, cfg, subset_ids, rephrased_dir)
    out = os.path.abspath(out_dir.rstrip("/").removeprefix("file://"))
    spec = StepSpec(PartitionedExportStep, (out, sel.wanted, cfg, out, shard_urls, sel.rephrased, sel.head(cfg)),
                    {"code_version": code_version, "source": source}, on_mismatch=on_mismatch)
    return spec, export_units(shard_urls, cfg.partition_shards)


def _export_partitioned(shard_urls: list[str], sel: _Selection, out_dir: str, cfg: ExportConfig, code_version: str,
                        source: str, resume: bool, t0: float) -> dict[str, Any]:
    """`export_curated` with `partition_shards` > 0: built in `out_dir` itself under its writer lock (the one the
    one-unit swap takes). The manifest and card are removed first (a reader finds no export rather than a mixed
    one) and written last by the reduce; without `resume` every earlier output is removed too, with it the
    finished units of an interrupted export with the same config and code are kept (another config or code:
    all recomputed)."""
    spec, units = export_plan(shard_urls, sel.dirs, out_dir, cfg, code_version=code_version, source=source,
                              on_mismatch="recompute", selection=sel)
    out = spec.args[0]
    parent, name = os.path.split(out)
    os.makedirs(out, exist_ok=True)
    with folder_lock(parent, f"partitioned export into {out}", lock_name=f".{name}.writer.lock"):
        for f in (MANIFEST, CARD):
            Path(out, f).unlink(missing_ok=True)
        if not resume:
            for sub in ("shards", PARTS, f"ledger/{STEP}"):
                shutil.rmtree(Path(out, sub), ignore_errors=True)
        done = run_fanout(spec, units, cfg.fanout)
    step = spec.build()
    manifest = partitioned_manifest(step.head, cfg, merge_parts(step.parts_dir, step.unit_names()))
    log.info("export done: %d samples in %d shards from %d units (%d done now, %d resumed), %.1f MB, %.1f s",
             manifest["n_samples"], manifest["n_shards"], len(units), len(done.done), len(done.skipped),
             manifest["n_bytes"] / 1e6, time.time() - t0)
    return manifest


def finished_export(out_dir: str, cfg: ExportConfig) -> dict[str, Any] | None:
    """The manifest of the export in `out_dir` (path or URL) when it is finished (manifest, dataset card and
    export ledger part published) and was made with `cfg` and this code (its stamp, core/foundation/stamp.py);
    else None. The completion check of a whole export."""
    from core.foundation.stamp import code_version as module_version
    from core.foundation.stamp import make_stamp, read_stamp

    out = out_dir.rstrip("/")
    manifest = export_manifest(out)
    if manifest is None or manifest.get("config") != manifest_config(cfg):
        return None
    fs, root = fsspec.core.url_to_fs(out)
    part = f"part-{STEP}.parquet" if not cfg.partition_shards else "part-u*.parquet"  # a partition's: any unit
    if not (fs.exists(f"{root}/{CARD}") and fs.glob(f"{root}/ledger/{STEP}/{part}")):
        return None
    probe = ExportStep(out, Passing.of([]), cfg, out, [], {})
    want = make_stamp(STEP, probe.stamp_config(), module_version(ExportStep.__module__))
    return manifest if read_stamp(f"{out}/ledger/{STEP}") == want else None


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


@contextlib.contextmanager
def _fresh_export(out: str) -> Iterator[str]:
    """The folder to build the export in, so that no file of an earlier export survives beside it.

    Local: a fresh sibling folder (`core.foundation.step.fresh_dir`), swapped in whole (`core.foundation.step.swap_in`) when the
    export is written or has failed its count check (its ledger then says why); the previous export is
    removed. Any other error leaves the previous export untouched. The swap holds the writer lock
    `<parent>/.<name>.writer.lock`, so two exports into one folder cannot interleave their renames.
    Object stores (no rename): the previous manifest is removed first (a reader finds no export rather than
    a mixed one), then its shards and ledger, and the export is written in place."""
    if _is_remote(out):
        fs, root = fsspec.core.url_to_fs(out)
        for sub in (MANIFEST, "shards", f"ledger/{STEP}"):
            if fs.exists(f"{root}/{sub}"):
                fs.rm(f"{root}/{sub}", recursive=True)
        yield out
        return
    final = os.path.abspath(out.removeprefix("file://"))
    staging = fresh_dir(final)
    try:
        yield staging
    except ExportError:
        _swap_export(staging, final)
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_export(staging, final)


def _swap_export(staging: str, final: str) -> None:
    parent, name = os.path.split(final)
    with folder_lock(parent, f"export swap of {final}", lock_name=f".{name}.writer.lock"):
        old = swap_in(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def manifest_shards(export_dir: str, kinds: Iterable[str] | None = None) -> list[str]:
    """The shard URLs of an export, from its manifest (kind order, then write order), optionally of some kinds
    only: what a trainer reads, never a glob of `shards/` (`core.io.wds.export_shards`). Raises FileNotFoundError
    when the export has no manifest (a failed or unfinished export)."""
    manifest = export_manifest(export_dir)
    if manifest is None:
        raise FileNotFoundError(f"{export_dir.rstrip('/')}/{MANIFEST}: no export manifest")
    return export_shards(export_dir, manifest, kinds)


def verify_export(out_dir: str) -> dict[str, Any]:
    """Re-hash every shard of an export and compare with its manifest; raises ExportError on a mismatch."""
    out = out_dir.rstrip("/")
    with fsspec.open(f"{out}/{MANIFEST}", "r", encoding="utf-8") as f:
        manifest = json.load(f)
    for sh in manifest["shards"]:
        h = hashlib.sha256()
        size = 0
        with fsspec.open(f"{out}/shards/{sh['name']}", "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        if h.hexdigest() != sh["sha256"] or size != sh["n_bytes"]:
            raise ExportError(f"shard {sh['name']} does not match the manifest (sha256 or size)")
    if sum(sh["n_samples"] for sh in manifest["shards"]) != manifest["n_samples"]:
        raise ExportError("manifest shard counts do not add up to n_samples")
    return manifest


def export_report_html(manifest: dict[str, Any]) -> str:
    """Deck HTML: summary, samples removed per step and reason, shard sizes."""
    import pandas as pd

    from core.foundation.report import figure_html, new_figure, page, plot_texts, table_html

    summary = {k: manifest[k] for k in ("selection", "subset", "n_samples", "n_shards", "n_bytes", "n_rephrased",
                                        "n_kept_by_last_step", "subset_outside_kept")}
    summary["rephrase_fallbacks"] = ", ".join(f"{k}={v}" for k, v in manifest["rephrase_fallbacks"].items())
    summary["image_format"] = manifest.get("loader_schema", {}).get("image_format", "")
    steps = pd.DataFrame([{k: r[k] for k in ("step", "inputs", "kept", "modified", "removed")}
                          for r in manifest["removed_by_step"]])
    reasons = pd.DataFrame([{"step": r["step"], **x} for r in manifest["removed_by_step"] for x in r["by_reason"]])
    shards = pd.DataFrame([{"shard": s["name"], "samples": s["n_samples"], "MB": s["n_bytes"] / 1e6,
                            "sha256": s["sha256"][:16]} for s in manifest["shards"]],
                          columns=["shard", "samples", "MB", "sha256"])  # columns also for an empty export
    parts = [table_html([summary], "export"), table_html(steps, "samples per step")]
    if len(reasons):
        fig, ax = new_figure(7, 0.35 * len(reasons) + 1.2)
        labels = [f"{r.step}: {r.reason}" for r in reasons.itertuples()]
        ax.barh(range(len(labels)), reasons["count"].tolist()[::-1])  # reasons carry data details: escaped
        ax.set_yticks(range(len(labels)), plot_texts(labels[::-1]))
        ax.set_xlabel("samples removed")
        parts += [figure_html(fig, "removed by step and reason"), table_html(reasons, "removed by reason")]
    fig, ax = new_figure()
    ax.hist(shards["MB"], bins=20)
    ax.set_xlabel("MB per shard")
    ax.set_ylabel("shards")
    parts += [figure_html(fig, "shard sizes"), table_html(shards, "shards")]
    return page(*parts)
