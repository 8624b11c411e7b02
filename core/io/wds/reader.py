"""WDS shard readers: `iter_shard` / `iter_samples` stream a shard from a local path or any fsspec URL (s3://...)
and turn every bad record into a ledger quarantine row with a reason; `list_shards` finds the shards."""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import fsspec

from core.foundation.ledger import LedgerWriter
from core.foundation.limits import (
    MAX_IMAGE_BYTES,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    check_depth,
    control_chars,
    decode_json,
)
from core.foundation.sample import MAX_TEXT_CHARS, MAX_TURNS, Sample, SampleError
from core.io.images import DEFAULT_MAX_PIXELS, decode_image
from core.io.wds.members import _member_problem, shard_name
from core.io.wds.tars import _local_path, _LocalTar, _PlainMember, _StreamTar

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 8 << 20  # a key.json larger than this is quarantined as oversize_text unparsed
# Regular files only: a GNU sparse member expands to the size its header declares (tarfile counts it as a
# file), links and devices name other files.
_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})


EXPORT_MANIFEST = "manifest.json"


def export_manifest(export_dir: str) -> dict | None:
    """The manifest of an export folder (local path or URL), or None when the folder holds none. Only an export's
    manifest counts: a dict whose `shards` are records with a `name` (ingest's `shards/manifest.json` lists paths)."""
    try:
        with fsspec.open(f"{str(export_dir).rstrip('/')}/{EXPORT_MANIFEST}", "r", encoding="utf-8") as f:
            m = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("shards"), list) and all(
        isinstance(sh, dict) and "name" in sh for sh in m["shards"])
    return m if ok else None


def export_shards(export_dir: str, manifest: dict, kinds: Iterable[str] | None = None) -> list[str]:
    """The shard URLs an export's manifest names (manifest order: kind, then write order), optionally of some
    kinds only. The one reader of an export's shard list: readers take it, never a glob (a stray tar beside the
    manifest is not part of the export). A name must be a file of the export's `shards/` (`<file>`, or
    `<kind>/<file>` since format 2): anything else raises ValueError."""
    out, wanted = str(export_dir).rstrip("/"), set(kinds) if kinds is not None else None
    urls = []
    for sh in manifest["shards"]:
        name = str(sh["name"])
        parts = name.split("/")
        if len(parts) > 2 or any(not x or x in (".", "..") or "\\" in x or control_chars(x) for x in parts):
            raise ValueError(f"{out}/shards: manifest shard name {name!r} is not a file of its shards/ folder")
        if wanted is None or sh.get("kind") in wanted:
            urls.append(f"{out}/shards/{name}")
    return urls


def list_shards(path: str) -> list[str]:
    """Sorted `.tar` shard URLs under a local dir / fsspec URL, or matching a brace/glob pattern; an export's
    `shards/` folder lists what its manifest names (kind folders, manifest order)."""
    if any(c in path for c in "{*?["):
        import braceexpand

        out: list[str] = []
        for p in braceexpand.braceexpand(path):
            out.extend(fsspec.open_files(p)) if any(c in p for c in "*?[") else out.append(p)
        return sorted(o if isinstance(o, str) else o.full_name for o in out)
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isfile(root):
        return [path]
    if root.rstrip("/").rsplit("/", 1)[-1] == "shards":  # an export's shards/: what its manifest names
        parent = path.rstrip("/").rsplit("/", 1)[0]
        manifest = export_manifest(parent)
        if manifest is not None:
            return export_shards(parent, manifest)
    names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return names if proto in ("file", "local") else [f"{proto}://{p}" for p in names]


@dataclass
class _Group:
    key: str
    json_bytes: bytes | None = None
    images: dict[int, tuple[str, bytes | _PlainMember]] = field(default_factory=dict)  # member or its data
    problem: tuple[str, str] | None = None  # (reason, detail) seen while collecting



class _Quarantine:
    """Quarantine sink shared by readers: writes ledger rows and counts reasons."""

    def __init__(self, ledger: LedgerWriter | None, shard: str):
        self.ledger, self.shard = ledger, shard
        self.counts: dict[str, int] = {}

    def __call__(self, sample_id: str, reason: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        log.warning("quarantine %s (%s): %s %s", sample_id, self.shard, reason, detail[:200])
        if self.ledger is not None:
            self.ledger.add(sample_id, "quarantine", reason, shard=self.shard, detail=detail[:500])



def iter_shard(
    url: str,
    *,
    quarantine: LedgerWriter | None = None,
    include_ids: set[str] | frozenset[str] | None = None,
    load_images: bool = True,
    verify_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_turns: int = MAX_TURNS,
    storage_options: dict | None = None,
) -> Iterator[Sample]:
    """Stream the valid samples of one shard; quarantine the rest with a reason.

    Members are bounded before they are read (regular files only; a json member at most MAX_JSON_BYTES,
    an image at most `max_image_bytes`) and a json member's nesting and integers before it is parsed
    (core/foundation/limits.py), so a hostile shard costs quarantine rows, not memory.

    `include_ids` restricts both output and quarantine rows to the ids that are inputs of the calling
    step (others are skipped silently: they were decided by an earlier step). Ids in `include_ids` that
    are never met in this shard are NOT reported here; see `iter_samples(expected=...)`.
    """
    sname = shard_name(url)
    q = _Quarantine(quarantine, sname)
    seen: set[str] = set()

    def finish(g: _Group) -> Sample | None:
        fallback_id = f"{sname}/{g.key}"
        if g.json_bytes is None:
            if include_ids is None or fallback_id in include_ids:
                q(fallback_id, *(g.problem or ("missing_json", f"members without {g.key}.json")))
            return None
        sid = fallback_id
        try:
            if len(g.json_bytes) > MAX_JSON_BYTES:
                raise SampleError("oversize_text", f"{len(g.json_bytes)} bytes of json")
            check_depth(g.json_bytes, MAX_JSON_DEPTH)
            try:
                text = g.json_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SampleError("non_utf8", str(e)) from None
            try:
                rec = decode_json(text, MAX_INT_DIGITS)
            except json.JSONDecodeError as e:
                raise SampleError("invalid_json", str(e)) from None
            if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) and str(rec["id"]).strip() \
                    and not control_chars(str(rec["id"])):
                sid = str(rec["id"])
            if include_ids is not None and sid not in include_ids:
                return None
            if g.problem:
                raise SampleError(*g.problem)
            s = Sample.from_record(rec, max_text_chars=max_text_chars, max_turns=max_turns)
            sid = s.id
            if sid in seen:
                raise SampleError("duplicate_id", f"id {sid} appears twice in shard")
            if len(g.images) != len(s.images) or sorted(g.images) != list(range(len(s.images))):
                raise SampleError("missing_image", f"record names {len(s.images)} images, shard has {len(g.images)}")
            if load_images:
                s.image_bytes = [image_data(g.images[i][1]) for i in range(len(s.images))]
                if verify_images:
                    for b in s.image_bytes:
                        decode_image(b, max_pixels)
            s.shard = sname
            seen.add(sid)
            return s
        except SampleError as e:
            if include_ids is None or sid in include_ids:
                q(sid, e.reason, e.detail)
            return None

    def image_data(x: bytes | _PlainMember) -> bytes:
        if isinstance(x, bytes):
            return x
        try:  # an indexed member lies inside the file: only a shard changed since the scan gets here
            return tar.read(x)
        except (tarfile.ReadError, OSError) as e:
            raise SampleError("truncated_tar", f"{type(e).__name__}: {e}") from None

    group: _Group | None = None
    local = _local_path(url, storage_options)
    tar = _LocalTar(local) if local is not None else _StreamTar(url, storage_options)
    try:  # the shard file stays open until the last sample is finished (lazy image reads)
        try:
            for m in tar:
                parsed = _member_problem(m.name)
                if isinstance(parsed, str) or m.type not in _REGULAR:
                    reason = parsed if isinstance(parsed, str) else "unsafe_member"
                    bad_key = m.name.split("/")[-1].partition(".")[0] or "member"
                    if group is not None and bad_key == group.key:
                        group.problem = group.problem or (reason, m.name)
                    else:
                        qid = f"{sname}/{m.name}"
                        if include_ids is None or qid in include_ids:
                            q(qid, reason, f"member {m.name!r} type {m.type!r}")
                    continue
                key, kind, idx = parsed
                if group is None or key != group.key:
                    if group is not None and (s := finish(group)) is not None:
                        yield s
                    group = _Group(key)
                cap = max_image_bytes if kind == "image" else MAX_JSON_BYTES
                if m.size > cap:  # never read: the group is quarantined with the bound
                    reason = "oversize_image" if kind == "image" else "oversize_text"
                    group.problem = group.problem or (reason, f"member {m.name!r}: {m.size} bytes > {cap}")
                    continue
                # images of an indexed shard are read only for samples that are wanted (a subset export
                # reads just its subset); elsewhere reads stay in member order, where a cut is detected
                data = m if tar.lazy and kind == "image" else tar.read(m)
                if kind == "json":
                    if group.json_bytes is not None:
                        group.problem = group.problem or ("duplicate_key", f"two json members for {key}")
                    group.json_bytes = data
                else:
                    if idx in group.images:
                        group.problem = group.problem or ("duplicate_key", f"two image members #{idx} for {key}")
                    group.images[idx] = (m.name, data)
        except (tarfile.ReadError, EOFError, OSError, tarfile.HeaderError) as e:
            # A truncated/corrupt tar: the group in flight cannot be trusted; later samples are unreadable
            # and are reported by iter_samples(expected=...) as missing_from_shard.
            if group is not None:
                group.problem = ("truncated_tar", f"{type(e).__name__}: {e}")
                finish(group)
                group = None
            log.error("shard %s is truncated or corrupt: %s", url, e)
            if include_ids is None:  # ingest-style read: record the shard-level loss itself
                q(f"{sname}/__truncated__", "truncated_tar", f"{type(e).__name__}: {e}")
        if group is not None and (s := finish(group)) is not None:
            yield s
    finally:
        tar.close()


def iter_samples(
    urls: Iterable[str],
    *,
    quarantine: LedgerWriter | None = None,
    include_ids: set[str] | frozenset[str] | None = None,
    expected: bool = True,
    **kwargs,
) -> Iterator[Sample]:
    """Stream samples of several shards in order (see `iter_shard`).

    With `include_ids` and `expected=True`, ids that were expected but never met (e.g. lost to a
    truncated shard) are quarantined as `missing_from_shard` at the end, so no input vanishes.
    """
    met: set[str] = set()
    for url in urls:
        for s in iter_shard(url, quarantine=quarantine, include_ids=include_ids, **kwargs):
            met.add(s.id)
            yield s
    if include_ids is not None and expected and quarantine is not None:
        for sid in sorted(set(include_ids) - met - quarantine.decided):
            quarantine.add(sid, "quarantine", "missing_from_shard", detail="expected input not found in any shard")
