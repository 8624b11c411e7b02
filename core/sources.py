"""Input dialects and source accounting for ingest.

A source is one file, a folder, or a glob/brace pattern of files of one container kind:

    json      a JSON array of records (streamed; one malformed item is quarantined alone)
    jsonl     one record per line
    wds       WebDataset shards (.tar): members grouped by key, images as members (key.jpg, key.0.jpg ...)
    parquet   rows, images as Hugging Face `datasets` writes them (struct {bytes, path}) or path strings

and records in one of two dialects, detected per record:

    llava     {"id", "image": str | [str], "conversations": [{"from", "value"}]}
    messages  ShareGPT / LLaMA-Factory / HF chat: {"messages": [{"role", "content": str | [parts]}], "images"}

`format` forces either half: "auto", a container ("json", "jsonl", "wds", "parquet"), a dialect ("llava",
"messages") or both ("jsonl:messages"). Every reader yields `SourceRecord`s (a record normalized to the
LLaVA form, or the problem that stopped it, with its position); `count_records` counts the records of
every file by a separate, parser-independent pass over the raw bytes / tar headers / Parquet footers, and
ingest proves that it wrote one ledger row per counted record.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import ijson

from core.images import IMAGE_EXTS, image_ext
from core.sample import IMAGE_TOKEN, SampleError

CONTAINERS = ("json", "jsonl", "wds", "parquet")
DIALECTS = ("llava", "messages")
_EXT_CONTAINER = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tar": "wds", ".parquet": "parquet"}
VIDEO_EXTS = frozenset({"mp4", "webm", "avi", "mov", "mkv", "m4v"})
AUDIO_EXTS = frozenset({"wav", "mp3", "flac", "ogg", "m4a", "opus"})
CAPTION_KEYS = ("caption", "txt", "text")
# A caption-only WDS sample (image + .txt) becomes this question with the caption as the answer.
DEFAULT_CAPTION_PROMPT = "Describe the image briefly."
# webdataset's own key/suffix split (`base_plus_ext`): key = path up to the first dot of the basename
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
MAX_MEMBER_TEXT = 64 << 10  # small text members other than json/txt are kept in `meta` up to this size


class SourceError(RuntimeError):
    """A source whose records cannot be delimited (wrong container, structure broken at a byte offset)."""


@dataclass
class SourceRecord:
    """One record of a source: `record` (LLaVA-form dict), or `problem` (reason, detail) with the raw record
    when there is one (its id keys the quarantine row).

    `image_bytes` are the images a container carries inline (WDS members, Parquet bytes), aligned with the
    record's image names; None when the images live under `image_root`.
    """

    file: str
    index: int
    record: dict[str, Any] | None = None
    problem: tuple[str, str] | None = None
    offset: int | None = None  # byte offset of a JSON array item
    image_bytes: list[bytes] | None = None
    fallback_id: str = ""
    implicit_images: bool = False  # images come from members/columns, not named in the text

    @property
    def position(self) -> dict[str, Any]:
        pos: dict[str, Any] = {"file": self.file.rsplit("/", 1)[-1], "record_index": self.index}
        if self.offset is not None:
            pos["byte_offset"] = self.offset
        return pos


@dataclass(frozen=True)
class SourceFormat:
    container: str
    dialect: str = "auto"  # auto = per record: "messages" when the record has messages and no conversations


def parse_format(spec: str) -> tuple[str, str]:
    """`"auto"`, `"jsonl"`, `"messages"`, `"parquet:messages"` -> (container or "auto", dialect or "auto")."""
    container, dialect = "auto", "auto"
    for part in [p for p in (spec or "auto").lower().split(":") if p]:
        if part in CONTAINERS:
            container = part
        elif part in DIALECTS:
            dialect = part
        elif part != "auto":
            raise ValueError(f"format {spec!r}: {part!r} is none of auto, {', '.join(CONTAINERS + DIALECTS)}")
    return container, dialect


def list_source_files(source: str) -> list[str]:
    """The files of a source, sorted: the file itself, a folder's data files, or a glob/brace pattern."""
    if any(c in source for c in "{*?["):
        import braceexpand

        out: list[str] = []
        for p in braceexpand.braceexpand(source):
            out.extend(f.full_name if "://" in source else f.path for f in fsspec.open_files(p))
        return sorted(out)
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        raise FileNotFoundError(f"source {source!r} does not exist")
    if not fs.isdir(root):
        return [source]
    names = sorted(p for p in fs.ls(root, detail=False) if PurePosixPath(p).suffix.lower() in _EXT_CONTAINER)
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return names if proto in ("file", "local") else [f"{proto}://{p}" for p in names]


def detect_container(path: str) -> str:
    """Container from the extension; a `.json` file whose first byte is `{` is read as JSONL."""
    ext = PurePosixPath(path.split("?", 1)[0]).suffix.lower()
    kind = _EXT_CONTAINER.get(ext)
    if kind is None:
        raise SourceError(f"{path}: cannot tell the format from {ext or 'no extension'!r}; pass format=")
    if kind == "json":
        with fsspec.open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head[:1] == b"{":
            return "jsonl"
    return kind


# ---------------------------------------------------------------------------------------------------------
# JSON arrays: a byte-level splitter of top-level items (counting, and resync after a malformed item)
# ---------------------------------------------------------------------------------------------------------
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # one whole JSON string, escapes included
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|["\[\]{}]', re.S)  # a string, a bracket, or a lone quote
_SCALAR_END = re.compile(rb'[,\]\[{}"]')
_NON_WS = re.compile(rb"[^ \t\r\n]")
_LC, _RC, _LB, _RB, _COMMA, _QUOTE = b"{}[],\""  # byte values
_CLOSE = {_RC: _LC, _RB: _LB}


def split_json_array(f, keep_bytes: bool = True, chunk_size: int = 1 << 20
                     ) -> Iterator[tuple[int, int, bytes | None, str]]:
    """Yield `(index, byte offset, raw item bytes or None, error)` for every top-level item of a JSON array,
    scanning bytes only (whole strings skipped by one regex match, brackets counted, nothing decoded), so a
    non-UTF-8 or otherwise unparsable item does not hide the items after it. `error` is "" or, for an item
    cut by the end of the file, "truncated". Raises SourceError naming the byte offset where items cannot be
    delimited (not an array, unbalanced brackets, data after the array)."""
    buf, base, pos, eof = b"", 0, 0, False  # base: absolute offset of buf[0]; pos: scan position in buf
    size = chunk_size
    state = "start"  # start | between | item | done
    stack: list[int] = []  # open brackets of the current item
    scalar = False  # the current item is a bare scalar or string: it ends at the next , or ]
    expect_item = True  # after '[' or ',': an item must come before the next ',' or ']'
    index, start = 0, 0  # current item: its index and absolute start offset
    while True:
        resume = -1  # >= 0: more bytes are needed; scanning resumes at buf[resume]
        if state != "item":
            m = _NON_WS.search(buf, pos)
            if m is None:
                resume = len(buf)
            else:
                c, at = buf[m.start()], base + m.start()
                pos = m.end()
                if state == "start":
                    if at == 0 and buf.startswith(b"\xef\xbb\xbf"):
                        pos = 3
                        continue
                    if c != _LB:
                        raise SourceError(f"not a JSON array: byte {at} is {chr(c)!r}, expected '['")
                    state = "between"
                elif state == "done":
                    raise SourceError(f"data after the end of the JSON array at byte {at}")
                elif c == _RB:
                    state = "done"
                elif c == _COMMA:
                    if expect_item:
                        raise SourceError(f"empty item (',') in the JSON array at byte {at}")
                    expect_item = True
                else:  # an item starts here
                    state, start, expect_item = "item", at, False
                    stack, scalar = ([c], False) if c in (_LC, _LB) else ([], True)
                    if c == _QUOTE:
                        pos = m.start()  # the string scalar is matched whole below
        elif scalar:
            if buf[pos:pos + 1] == b'"' and base + pos == start:
                sm = _STRING.match(buf, pos)
                if sm is None:
                    resume = pos
                else:
                    pos = sm.end()
            if resume < 0:
                m = _SCALAR_END.search(buf, pos)
                if m is None:
                    resume = len(buf)
                else:
                    c = buf[m.start()]
                    if c not in (_COMMA, _RB):
                        raise SourceError(f"unexpected {chr(c)!r} after a scalar item at byte {base + m.start()}")
                    raw = buf[start - base:m.start()].strip() if keep_bytes else None
                    yield index, start, raw, ""
                    index += 1
                    pos = m.end()
                    state, expect_item = ("between", True) if c == _COMMA else ("done", False)
        else:
            m = _TOKEN.search(buf, pos)
            if m is None:
                resume = len(buf)
            elif m.end() - m.start() == 1 and buf[m.start()] == _QUOTE:
                resume = m.start()  # a string that goes on past the buffer
            else:
                pos = m.end()
                c = buf[m.start()]
                if c in (_LC, _LB):
                    stack.append(c)
                elif c in (_RC, _RB):
                    if stack.pop() != _CLOSE[c]:
                        raise SourceError(f"unbalanced {chr(c)!r} at byte {base + m.start()}: "
                                          "items cannot be delimited")
                    if not stack:  # the item closed
                        yield index, start, buf[start - base:pos] if keep_bytes else None, ""
                        index, state = index + 1, "between"
        if resume < 0:
            continue
        if eof:
            break
        data = f.read(size)
        if not data:
            eof = True
        keep = min(resume, start - base) if state == "item" and keep_bytes else resume
        if state == "item" and scalar and base + resume == start:
            keep = resume  # a string scalar is re-matched from its start
        grew = keep == 0 and len(buf) >= size
        buf, base, pos = buf[keep:] + data, base + keep, resume - keep
        size = size * 2 if grew else chunk_size  # a long string or item: read more at once (no quadratic rescans)
    if state == "item":  # the file ends inside an item: it is one (cut) record
        yield index, start, buf[start - base:] if keep_bytes else None, "truncated"
    elif state == "start":
        raise SourceError("empty file: expected a JSON array")


def _json_item(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise SampleError("non_utf8", str(e)) from None
    except json.JSONDecodeError as e:
        raise SampleError("invalid_json", str(e)) from None


def _iter_json(path: str) -> Iterator[SourceRecord]:
    """ijson streams the array fast; at its first error the byte splitter takes over from that item on, so a
    malformed item is quarantined alone (with its byte offset) and every later item is still read."""
    i = 0
    with fsspec.open(path, "rb") as f:
        try:
            for rec in ijson.items(f, "item", use_float=True):
                yield SourceRecord(path, i, record=rec)
                i += 1
            return
        except (ijson.JSONError, UnicodeDecodeError, ValueError):
            pass  # resync below
    with fsspec.open(path, "rb") as f:
        for idx, off, raw, err in split_json_array(f):
            if idx < i:
                continue
            if err:
                yield SourceRecord(path, idx, problem=("invalid_json", f"file ends inside item {idx} (byte {off})"),
                                   offset=off)
                continue
            try:
                yield SourceRecord(path, idx, record=_json_item(raw), offset=off)
            except SampleError as e:
                yield SourceRecord(path, idx, problem=(e.reason, f"item {idx} at byte {off}: {e.detail[:300]}"),
                                   offset=off)


def _iter_jsonl(path: str) -> Iterator[SourceRecord]:
    with fsspec.open(path, "rb") as f:
        idx = 0
        for line in f:
            if not line.strip():
                continue
            try:
                yield SourceRecord(path, idx, record=_json_item(line))
            except SampleError as e:
                yield SourceRecord(path, idx, problem=(e.reason, f"line record {idx}: {e.detail[:300]}"))
            idx += 1


# ---------------------------------------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------------------------------------
def _wds_split(name: str) -> tuple[str, str]:
    m = _WDS_KEY.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


@dataclass
class _WdsGroup:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # suffix -> data
    problem: tuple[str, str] | None = None


def _tar_groups(path: str) -> Iterator[_WdsGroup]:
    """Consecutive members with the same key, in tar order (as webdataset groups them). A read error ends
    the shard: the group in flight and a `<shard>/__truncated__` marker carry `truncated_tar`."""
    group: _WdsGroup | None = None
    with fsspec.open(path, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, suffix = _wds_split(m.name)
                    if group is None or key != group.key:
                        if group is not None:
                            yield group
                        group = _WdsGroup(key)
                    data = tar.extractfile(m).read()
                    if suffix.lower() in group.members:
                        group.problem = group.problem or ("duplicate_key", f"two {suffix!r} members for {key}")
                    group.members[suffix.lower()] = data
        except (tarfile.TarError, EOFError, OSError) as e:
            if group is not None:
                group.problem = ("truncated_tar", f"{type(e).__name__}: {e}")
                yield group
            yield _WdsGroup("__truncated__", problem=("truncated_tar", f"{type(e).__name__}: {e}"))
            return
    if group is not None:
        yield group


def _wds_record(g: _WdsGroup, caption_prompt: str) -> tuple[dict[str, Any], list[bytes]]:
    """A member group -> (record, image bytes). Images: `key.<ext>` or `key.<i>.<ext>` (not both); text:
    `key.json` (a record of either dialect, or {"caption"|"text": ...}) or `key.txt` (a caption)."""
    if g.problem:
        raise SampleError(*g.problem)
    images: dict[int, tuple[str, bytes]] = {}
    rec: dict[str, Any] | None = None
    caption = None
    meta: dict[str, Any] = {}
    for suffix, data in g.members.items():
        parts = suffix.split(".")
        ext = parts[-1]
        if ext in VIDEO_EXTS:
            raise SampleError("unsupported_modality:video", f"member {g.key}.{suffix}")
        if ext in AUDIO_EXTS:
            raise SampleError("unsupported_modality:audio", f"member {g.key}.{suffix}")
        if ext in IMAGE_EXTS and (len(parts) == 1 or (len(parts) == 2 and parts[0].isdigit())):
            idx = int(parts[0]) if len(parts) == 2 else -1
            if idx in images:
                raise SampleError("duplicate_key", f"two images #{idx} for {g.key}")
            images[idx] = (f"{PurePosixPath(g.key).name}.{suffix}", data)
        elif suffix == "json":
            r = _json_item(data)
            if not isinstance(r, dict):
                raise SampleError("invalid_json", f"{g.key}.json is {type(r).__name__}, not an object")
            rec = r
        elif suffix in ("txt", "caption"):
            try:
                caption = data.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise SampleError("non_utf8", f"{g.key}.{suffix}: {e}") from None
        elif suffix.startswith("__"):
            continue  # webdataset bookkeeping (__key__, __url__) never appears in tars, but be safe
        else:
            try:
                meta[suffix] = data.decode("utf-8") if len(data) <= MAX_MEMBER_TEXT else f"<{len(data)} bytes>"
            except UnicodeDecodeError:
                meta[suffix] = f"<{len(data)} bytes>"
    if -1 in images and len(images) > 1:
        raise SampleError("duplicate_key", f"{g.key} has both an unindexed and indexed images")
    order = sorted(images)
    if order and order != ([-1] if order == [-1] else list(range(len(order)))):
        raise SampleError("missing_image", f"{g.key}: image indices {order} are not 0..{len(order) - 1}")
    names = [images[i][0] for i in order]
    data = [images[i][1] for i in order]
    if rec is None or ("conversations" not in rec and "messages" not in rec):
        rec = dict(rec or {})
        cap = caption if caption is not None else next((rec.pop(k) for k in CAPTION_KEYS if k in rec), None)
        if not isinstance(cap, str) or not cap.strip():
            raise SampleError("empty_conversation", f"{g.key}: no json conversation and no caption")
        rec["conversations"] = [{"from": "human", "value": caption_prompt},
                                {"from": "gpt", "value": cap.strip()}]
    elif caption is not None:
        meta["txt"] = caption
    rec.setdefault("id", g.key)
    if meta and isinstance(rec.get("meta") or {}, dict):  # a non-object "meta" is quarantined by from_record
        rec["meta"] = {**(rec.get("meta") or {}), **meta}
    named = rec.pop("image", rec.pop("images", None))
    if isinstance(named, str):
        named = [named]
    if isinstance(named, list) and len(named) == len(names) and all(isinstance(x, str) and x for x in named):
        names = named  # the record names its images: keep the names, the bytes come from the members
    rec["image"] = names
    return rec, data


def _iter_wds(path: str, caption_prompt: str) -> Iterator[SourceRecord]:
    shard = PurePosixPath(path).name
    for i, g in enumerate(_tar_groups(path)):
        fid = f"{shard}/{g.key}"
        try:
            rec, data = _wds_record(g, caption_prompt)
            yield SourceRecord(path, i, record=rec, image_bytes=data, fallback_id=fid, implicit_images=True)
        except SampleError as e:
            yield SourceRecord(path, i, problem=(e.reason, e.detail), fallback_id=fid)


# ---------------------------------------------------------------------------------------------------------
# Parquet (as Hugging Face `datasets` writes it: Image -> struct<bytes: binary, path: string>)
# ---------------------------------------------------------------------------------------------------------
def _parquet_images(value: Any, sid: str) -> tuple[list[str], list[bytes] | None]:
    """Image column value -> (names, bytes or None when every image is a path under image_root)."""
    if value is None:
        return [], None
    items = value if isinstance(value, list) else [value]
    names: list[str] = []
    blobs: list[bytes | None] = []
    for i, it in enumerate(items):
        if isinstance(it, str):
            names.append(it)
            blobs.append(None)
        elif isinstance(it, dict) and (it.get("bytes") is not None or it.get("path")):
            b = it.get("bytes")
            path = it.get("path") or ""
            if b is not None:
                names.append(PurePosixPath(path).name or f"{sid}.{i}.{image_ext(b, 'x.jpg')}")
            else:
                names.append(path)
            blobs.append(b)
        else:
            raise SampleError("invalid_json", f"image #{i} is neither a path nor {{bytes, path}}")
    if all(b is None for b in blobs):
        return names, None
    if any(b is None for b in blobs):
        raise SampleError("invalid_json", "images mix inline bytes and paths")
    return names, blobs  # type: ignore[return-value]


def _drop_nulls(x: Any) -> Any:
    """Arrow structs give every field of the union type; a field that is null was absent in the record."""
    if isinstance(x, dict):
        return {k: _drop_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_nulls(v) for v in x]
    return x


def _iter_parquet(path: str, batch_rows: int = 256) -> Iterator[SourceRecord]:
    import pyarrow.parquet as pq

    i = 0
    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                sid = str(row.get("id") if row.get("id") is not None else f"{PurePosixPath(path).stem}#{i}")
                try:
                    img_col = "images" if row.get("images") is not None else "image"
                    names, blobs = _parquet_images(row.pop(img_col, None), sid)
                    row.pop("images" if img_col == "image" else "image", None)
                    rec = {k: _drop_nulls(v) for k, v in row.items() if v is not None}
                    if names:
                        rec["image"] = names
                    yield SourceRecord(path, i, record=rec, image_bytes=blobs, implicit_images=True)
                except SampleError as e:
                    yield SourceRecord(path, i, problem=(e.reason, e.detail), fallback_id=sid)
                i += 1


# ---------------------------------------------------------------------------------------------------------
# dialects
# ---------------------------------------------------------------------------------------------------------
_ROLE = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "system": "system"}


def _content_text(content: Any, images: list[str], i: int) -> str:
    """A message's `content` (string, or list of {type: text|image|video|audio} parts) -> LLaVA text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SampleError("role_broken", f"message {i} content is {type(content).__name__}")
    out: list[str] = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            out.append(str(p.get("text") or ""))
        elif kind in ("image", "image_url"):
            out.append(IMAGE_TOKEN)
            url = p.get("image_url")
            src = p.get("image") or p.get("path") or p.get("url") or (url.get("url") if isinstance(url, dict) else url)
            if isinstance(src, str) and src:
                images.append(src)
        elif kind in ("video", "video_url", "audio", "input_audio"):
            raise SampleError(f"unsupported_modality:{kind.split('_')[0].replace('input', 'audio')}",
                              f"message {i} has a {kind} part")
        else:
            raise SampleError("role_broken", f"message {i} has a content part of type {kind!r}")
    return "\n".join(x for x in out if x)


def messages_to_llava(rec: dict[str, Any]) -> dict[str, Any]:
    """ShareGPT / LLaMA-Factory / HF chat record (`messages` with role/content, `images`) -> LLaVA record.
    user/assistant/system roles map to human/gpt/system; image parts become `<image>` placeholders."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise SampleError("empty_conversation", "missing or empty 'messages'")
    part_images: list[str] = []
    conv = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise SampleError("role_broken", f"message {i} is not an object")
        role = _ROLE.get(m.get("role"))
        if role is None:
            raise SampleError("role_broken", f"message {i} has role {m.get('role')!r}")
        conv.append({"from": role, "value": _content_text(m.get("content"), part_images, i)})
    out = {k: v for k, v in rec.items() if k not in ("messages", "images", "image")}
    images = rec.get("images", rec.get("image"))
    if images is None and part_images:
        images = part_images
    if images is not None:
        out["image"] = images
    out["conversations"] = conv
    return out


def normalize(rec: Any, dialect: str = "auto", implicit_images: bool = False) -> Any:
    """A record of either dialect -> the LLaVA form `Sample.from_record` reads (non-dicts pass through
    to be quarantined there). With `implicit_images` (images are WDS members / Parquet cells the text may
    not mark), a conversation without any `<image>` gets one per image at the start of the first turn."""
    if not isinstance(rec, dict):
        return rec
    d = dialect
    if d == "auto":
        d = "messages" if "messages" in rec and "conversations" not in rec else "llava"
    if d == "messages":
        rec = messages_to_llava(rec)
    imgs = rec.get("image")
    n = 1 if isinstance(imgs, str) else len(imgs) if isinstance(imgs, list) else 0
    convs = rec.get("conversations")
    if implicit_images and n and isinstance(convs, list) and \
            not any(isinstance(t, dict) and IMAGE_TOKEN in str(t.get("value")) for t in convs):
        convs = [dict(t) if isinstance(t, dict) else t for t in convs]
        first = next((t for t in convs if isinstance(t, dict) and t.get("from") in ("human", "user")
                      and isinstance(t.get("value"), str)), None)
        if first is not None:
            first["value"] = (IMAGE_TOKEN + "\n") * n + first["value"]
            rec = {**rec, "conversations": convs}
    return rec


def iter_source(source: str, format: str = "auto", caption_prompt: str = DEFAULT_CAPTION_PROMPT
                ) -> Iterator[SourceRecord]:
    """Every record of every file of `source`, in file order, normalized to the LLaVA form."""
    container, dialect = parse_format(format)
    for path in list_source_files(source):
        kind = container if container != "auto" else detect_container(path)
        if kind == "json":
            it = _iter_json(path)
        elif kind == "jsonl":
            it = _iter_jsonl(path)
        elif kind == "wds":
            it = _iter_wds(path, caption_prompt)
        else:
            it = _iter_parquet(path)
        for r in it:
            if r.record is not None:
                try:
                    r.record = normalize(r.record, dialect, implicit_images=r.implicit_images)
                except SampleError as e:
                    r.problem = (e.reason, e.detail)  # the raw record stays: its id keys the ledger row
            yield r


# ---------------------------------------------------------------------------------------------------------
# source accounting (independent of the readers above)
# ---------------------------------------------------------------------------------------------------------
def count_records(source: str, format: str = "auto") -> dict[str, int]:
    """Records per file, counted without the parsers: JSON arrays by a byte-level scan of top-level items,
    JSONL by non-blank lines, WDS by consecutive member-key groups in the tar headers (+1 for an unreadable
    tail), Parquet by the row counts in the file footers. Raises SourceError where a JSON array's items
    cannot be delimited (naming the byte offset)."""
    import pyarrow.parquet as pq

    container, _ = parse_format(format)
    out: dict[str, int] = {}
    for path in list_source_files(source):
        kind = container if container != "auto" else detect_container(path)
        n = 0
        with fsspec.open(path, "rb") as f:
            if kind == "json":
                try:
                    for _ in split_json_array(f, keep_bytes=False):
                        n += 1
                except SourceError as e:
                    raise SourceError(f"{path}: {e}") from None
            elif kind == "jsonl":
                for line in f:
                    n += bool(line.strip())
            elif kind == "wds":
                last = None
                try:
                    with tarfile.open(fileobj=f, mode="r|") as tar:
                        for m in tar:
                            if m.isfile():
                                key = _wds_split(m.name)[0]
                                n += key != last
                                last = key
                except (tarfile.TarError, EOFError, OSError):
                    n += 1  # the `__truncated__` marker row
            else:
                n = pq.ParquetFile(f).metadata.num_rows
        out[path] = n
    return out
