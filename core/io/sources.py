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
"messages", or its alias "sharegpt") or both ("jsonl:messages"). A top-level `system_prompt` (lmms-finetune)
or `system` (LLaMA-Factory) becomes the conversation's system turn. Every reader yields `SourceRecord`s (a
record normalized to the LLaVA form, or the problem that stopped it, with its position); `count_records`
counts the records of every file by a separate, parser-independent pass over the raw bytes / tar headers /
Parquet footers, and ingest proves that it wrote one ledger row per counted record.

Every reader applies the door's bounds (core/foundation/limits.py, docs/security.md) before a parser sees a record:
size and nesting depth from the bytes, integer digits in the parser, tar member type and size from the
header; a record over a bound is one quarantine row, never an exception or an unbounded allocation.
"""

from __future__ import annotations

import contextlib
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import ijson

from core.foundation.limits import DEFAULT_LIMITS, InputLimits, control_chars, load_json, printable
from core.foundation.sample import IMAGE_TOKEN, SampleError
from core.io.images import IMAGE_EXTS, image_ext

CONTAINERS = ("json", "jsonl", "wds", "parquet")
DIALECTS = ("llava", "messages")
DIALECT_ALIASES = {"sharegpt": "messages"}  # LLaMA-Factory's name for the messages layout
# Top-level system prompt fields (lmms-finetune `system_prompt`, LLaMA-Factory `system`), first one wins
SYSTEM_FIELDS = ("system_prompt", "system")
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


@dataclass(frozen=True)
class Span:
    """A contiguous range of one file's records (a source partition, core/io/partition.py): records
    `first .. first + n - 1` (their indices in the whole file), which lie in bytes `start .. stop` (JSON array:
    from the first item's first byte to the next item's first byte; JSONL: whole lines) or row groups
    `start .. stop` (Parquet); `stop == -1`: to the end of the file."""

    first: int
    n: int
    start: int
    stop: int = -1


class _SpanReader:
    """A read-only file view of bytes `start .. stop` of `f` (`stop == -1`: to the end), with `prefix` before
    and `suffix` after (a JSON array item range becomes `[` + items + `null]`, an array of its own)."""

    def __init__(self, f, start: int, stop: int, prefix: bytes = b"", suffix: bytes = b""):
        f.seek(start)
        self.f, self.left = f, (stop - start if stop >= 0 else -1)
        self.head, self.tail = prefix, suffix

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        out = b""
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            n -= len(out)
        if n > 0 and self.left != 0:
            want = n if self.left < 0 else min(n, self.left)
            data = self.f.read(want)
            if self.left > 0:
                self.left = self.left - len(data) if data else 0
            if not data:
                self.left = 0
            out += data
            n -= len(data)
        if n > 0 and self.left == 0 and self.tail:
            piece, self.tail = self.tail[:n], self.tail[n:]
            out += piece
        return out


def parse_format(spec: str) -> tuple[str, str]:
    """`"auto"`, `"jsonl"`, `"messages"`, `"parquet:messages"` -> (container or "auto", dialect or "auto");
    `sharegpt` is an alias of `messages`."""
    container, dialect = "auto", "auto"
    for part in [p for p in (spec or "auto").lower().split(":") if p]:
        part = DIALECT_ALIASES.get(part, part)
        if part in CONTAINERS:
            container = part
        elif part in DIALECTS:
            dialect = part
        elif part != "auto":
            names = ", ".join(CONTAINERS + DIALECTS + tuple(DIALECT_ALIASES))
            raise ValueError(f"format {spec!r}: {part!r} is none of auto, {names}")
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
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.S)  # a string's content up to its closing quote
_SCALAR_END = re.compile(rb'[,\]\[{}"]')
_NON_WS = re.compile(rb"[^ \t\r\n]")
_LC, _RC, _LB, _RB, _COMMA, _QUOTE = b"{}[],\""  # byte values
_CLOSE = {_RC: _LC, _RB: _LB}


def _item_error(peak: int, cap: int, n_bytes: int, max_item_bytes: int) -> str:
    if peak > cap:
        return f"too_deep: nesting depth {peak} > max_json_depth={cap}"
    if max_item_bytes and n_bytes > max_item_bytes:
        return f"oversize_record: {n_bytes} bytes > max_record_bytes={max_item_bytes}"
    return ""


def split_json_array(f, keep_bytes: bool = True, chunk_size: int = 1 << 20, max_depth: int = 0,
                     max_item_bytes: int = 0) -> Iterator[tuple[int, int, bytes | None, str]]:
    """Yield `(index, byte offset, raw item bytes or None, error)` for every top-level item of a JSON array,
    scanning bytes only (whole strings skipped by one regex match, brackets counted, nothing decoded), so a
    non-UTF-8 or otherwise unparsable item does not hide the items after it. `error` is "" or "<reason>:
    <detail>": `truncated` for an item cut by the end of the file, `too_deep` for an item nesting deeper
    than `max_depth`, `oversize_record` for one longer than `max_item_bytes` (0: no bound); the bytes of
    such an item are not kept (None), and the scan holds at most `max_depth` brackets and about one chunk
    of it, so a hostile item costs time linear in its size and bounded memory. Raises SourceError naming
    the byte offset where items cannot be delimited (not an array, unbalanced brackets, data after the
    array; bracket kinds are checked up to `max_depth` deep)."""
    buf, base, pos, eof = b"", 0, 0, False  # base: absolute offset of buf[0]; pos: scan position in buf
    size = chunk_size
    state = "start"  # start | between | item | done
    stack: list[int] = []  # open brackets of the current item, up to max_depth
    cap = max_depth if max_depth > 0 else 1 << 62
    extra = peak = 0  # brackets open beyond the cap (not kept: their kind is not checked), deepest nesting
    drop = False  # the item is too deep or too big: its bytes are not kept, its long strings are skipped
    in_str = False  # (drop only) inside a string whose end is not yet read
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
                    extra, peak, drop, in_str = 0, len(stack), False, False
                    if c == _QUOTE:
                        pos = m.start()  # the string scalar is matched whole below
        elif in_str:  # skip a long string of a dropped item without holding it
            e = _STRING_BODY.match(buf, pos).end()
            if e < len(buf) and buf[e] == _QUOTE:
                pos, in_str = e + 1, False
            else:
                resume = e  # the end of the buffer, or a backslash whose escaped byte is not read yet
        elif scalar:
            if buf[pos:pos + 1] == b'"' and base + pos == start:
                sm = _STRING.match(buf, pos)
                if sm is None:
                    if drop:
                        pos, in_str = pos + 1, True
                        continue
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
                    err = _item_error(peak, cap, base + m.start() - start, max_item_bytes)
                    raw = buf[start - base:m.start()].strip() if keep_bytes and not drop and not err else None
                    yield index, start, raw, err
                    index += 1
                    pos = m.end()
                    state, expect_item = ("between", True) if c == _COMMA else ("done", False)
        else:
            m = _TOKEN.search(buf, pos)
            if m is None:
                resume = len(buf)
            elif m.end() - m.start() == 1 and buf[m.start()] == _QUOTE:
                if drop:
                    pos, in_str = m.end(), True
                else:
                    resume = m.start()  # a string that goes on past the buffer
            else:
                pos = m.end()
                c = buf[m.start()]
                if c in (_LC, _LB):
                    if len(stack) < cap:
                        stack.append(c)
                    else:
                        extra += 1
                        peak, drop = max(peak, cap + extra), True
                elif c in (_RC, _RB):
                    if extra:
                        extra -= 1
                    elif stack.pop() != _CLOSE[c]:
                        raise SourceError(f"unbalanced {chr(c)!r} at byte {base + m.start()}: "
                                          "items cannot be delimited")
                    if not stack:  # the item closed
                        err = _item_error(peak, cap, base + pos - start, max_item_bytes)
                        raw = buf[start - base:pos] if keep_bytes and not drop and not err else None
                        yield index, start, raw, err
                        index, state = index + 1, "between"
        if resume < 0:
            continue
        if state == "item" and not drop and max_item_bytes and base + len(buf) - start > max_item_bytes:
            drop = True  # stop holding the item; a string in flight is skipped from its opening quote
            if not in_str and resume < len(buf) and buf[resume] == _QUOTE:
                resume, in_str = resume + 1, True
        if eof:
            break
        data = f.read(size)
        if not data:
            eof = True
        keep = min(resume, start - base) if state == "item" and keep_bytes and not drop else resume
        if state == "item" and scalar and not drop and base + resume == start:
            keep = resume  # a string scalar is re-matched from its start
        grew = keep == 0 and len(buf) >= size
        buf, base, pos = buf[keep:] + data, base + keep, resume - keep
        size = size * 2 if grew else chunk_size  # a long string or item: read more at once (no quadratic rescans)
    if state == "item":  # the file ends inside an item: it is one (cut) record
        yield index, start, buf[start - base:] if keep_bytes and not drop else None, "truncated"
    elif state == "start":
        raise SourceError("empty file: expected a JSON array")


class _DigitWatch:
    """A file wrapper for the count pass: notes whether the bytes hold a run of more than `max_digits`
    digits anywhere (a number ijson would parse whole, where the scanner's path bounds it). Runs inside
    strings count too: a false alarm only sends the file to the slower, bounded path."""

    def __init__(self, f, max_digits: int):
        self.f, self.max_digits, self.found, self.tail = f, max_digits, False, b""
        self.run = re.compile(rb"[0-9]{%d}" % (max_digits + 1))

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data and not self.found:
            self.found = self.run.search(self.tail + data) is not None
            self.tail = data[-self.max_digits:]  # a run cut by the chunk boundary is seen whole next time
        return data


def _json_item(raw: bytes, limits: InputLimits = DEFAULT_LIMITS) -> Any:
    """One record's JSON bytes -> its value, the door's bounds checked first (core/foundation/limits.py)."""
    try:
        return load_json(raw, limits)
    except UnicodeDecodeError as e:
        raise SampleError("non_utf8", str(e)) from None
    except json.JSONDecodeError as e:
        raise SampleError("invalid_json", str(e)) from None
    except RecursionError:  # cannot happen under max_json_depth; kept so a raised bound still quarantines
        raise SampleError("too_deep", "JSON nesting exceeds the interpreter's recursion limit") from None


def _iter_json(path: str, limits: InputLimits = DEFAULT_LIMITS, clean: bool = False,
               span: Span | None = None) -> Iterator[SourceRecord]:
    """A JSON array's records. `clean`: the count pass scanned this file with the same `limits` and found
    no item over a bound and no over-long number; then ijson streams it (fast; its memory grows with the square of an item's depth,
    which is why it never sees an unchecked file). At ijson's first error, and for any file not known
    clean, the byte splitter delimits every item (bounding depth and size before a parser sees it) and json
    parses the item alone: a malformed or hostile item is quarantined alone (with its byte offset) and
    every later item is still read. `span`: only the items of that range (read as an array of their own:
    `[` + the range's bytes + `null]`), with their indices and byte offsets in the whole file."""
    i = 0
    first, n, shift = (span.first, span.n, span.start - 1) if span is not None else (0, -1, 0)
    if clean:
        with _open_span(path, span) as f:
            try:
                for rec in ijson.items(f, "item", use_float=True):
                    if i == n:
                        break  # the `null` closing a span
                    yield SourceRecord(path, first + i, record=rec)
                    i += 1
                return
            except (ijson.JSONError, UnicodeDecodeError, ValueError):
                pass  # resync below
    with _open_span(path, span) as f:
        for idx, off, raw, err in split_json_array(f, max_depth=limits.max_json_depth,
                                                   max_item_bytes=limits.max_record_bytes):
            if idx == n:
                break
            if idx < i:
                continue
            idx, off = first + idx, off + shift
            if err:
                reason, _, detail = err.partition(": ")
                if reason == "truncated":
                    reason, detail = "invalid_json", "file ends inside the item"
                yield SourceRecord(path, idx, problem=(reason, f"item {idx} at byte {off}: {detail}"), offset=off)
                continue
            try:
                yield SourceRecord(path, idx, record=_json_item(raw, limits), offset=off)
            except SampleError as e:
                yield SourceRecord(path, idx, problem=(e.reason, f"item {idx} at byte {off}: {e.detail[:300]}"),
                                   offset=off)


@contextlib.contextmanager
def _open_span(path: str, span: Span | None, jsonl: bool = False) -> Iterator[Any]:
    """The file, or the view of a span of it (a JSON item range wrapped into an array of its own)."""
    with fsspec.open(path, "rb") as f:
        if span is None:
            yield f
        elif jsonl:
            yield _SpanReader(f, span.start, span.stop)
        else:
            yield _SpanReader(f, span.start, span.stop, b"[", b"null]" if span.stop >= 0 else b"")


def iter_lines(f, max_bytes: int, chunk_size: int = 1 << 20) -> Iterator[bytes | int]:
    """The non-blank lines of a binary file (split at b"\\n", blank = only ASCII whitespace), holding at
    most `max_bytes` of one line: a longer line is yielded as its length (an int), its bytes dropped."""
    cur: list[bytes] = []  # pieces of the current line (empty once it is over the bound)
    n, blank, over = 0, True, False
    while data := f.read(chunk_size):
        pieces = data.split(b"\n")
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            n += len(piece)
            if blank and piece.strip():
                blank = False
            if not over:
                if n > max_bytes:
                    over, cur = True, []
                else:
                    cur.append(piece)
            if i < last:  # a newline ends the line
                if not blank:
                    yield n if over else b"".join(cur)
                cur, n, blank, over = [], 0, True, False
    if not blank:
        yield n if over else b"".join(cur)


def _iter_jsonl(path: str, limits: InputLimits = DEFAULT_LIMITS, span: Span | None = None) -> Iterator[SourceRecord]:
    with _open_span(path, span, jsonl=True) as f:
        for idx, line in enumerate(iter_lines(f, limits.max_record_bytes), span.first if span is not None else 0):
            if isinstance(line, int):
                yield SourceRecord(path, idx, problem=(
                    "oversize_record", f"line record {idx}: {line} bytes > max_record_bytes={limits.max_record_bytes}"))
                continue
            try:
                yield SourceRecord(path, idx, record=_json_item(line, limits))
            except SampleError as e:
                yield SourceRecord(path, idx, problem=(e.reason, f"line record {idx}: {e.detail[:300]}"))


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


# Regular files only: a GNU sparse member (tarfile counts it as a file) expands to the size its header
# declares (1 GiB from a 10 KB tar); links, devices and FIFOs name other files. Directories are skipped.
_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_TYPE_NAMES = {tarfile.GNUTYPE_SPARSE: "GNU sparse file", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link",
               tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


def _member_bound(m: tarfile.TarInfo, suffix: str, limits: InputLimits) -> tuple[str, str] | None:
    """Why a tar member must not be read (type, name, size: header fields only), or None."""
    if m.type not in _REGULAR:
        kind = _TYPE_NAMES.get(m.type, f"type {m.type!r}")
        return "unsafe_member", f"member {printable(m.name)!r} is a {kind}; only regular files are read"
    bad = control_chars(m.name)
    if bad:
        return "unsafe_member_name", f"member {printable(m.name)!r} has the control character {bad}"
    if suffix.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
        if m.size > limits.max_image_bytes:
            return "oversize_image", f"member {m.name!r}: {m.size} bytes > max_image_bytes={limits.max_image_bytes}"
    elif m.size > limits.max_record_bytes:
        return "oversize_record", f"member {m.name!r}: {m.size} bytes > max_record_bytes={limits.max_record_bytes}"
    return None


def _tar_groups(path: str, limits: InputLimits = DEFAULT_LIMITS) -> Iterator[_WdsGroup]:
    """Consecutive members with the same key, in tar order (as webdataset groups them). A read error ends
    the shard: the group in flight and a `<shard>/__truncated__` marker carry `truncated_tar`. A member over
    a bound (`_member_bound`) is never read; its group carries the reason."""
    group: _WdsGroup | None = None
    with fsspec.open(path, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for m in tar:
                    if m.isdir():
                        continue
                    key, suffix = _wds_split(m.name)
                    if group is None or key != group.key:
                        if group is not None:
                            yield group
                        group = _WdsGroup(key)
                    bound = _member_bound(m, suffix, limits)
                    if bound is not None:
                        group.problem = group.problem or bound
                        continue  # the stream skips the member's data unread
                    data = tar.extractfile(m).read(m.size)  # regular, and its size is within the bound
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


def _wds_record(g: _WdsGroup, caption_prompt: str, limits: InputLimits = DEFAULT_LIMITS
                ) -> tuple[dict[str, Any], list[bytes]]:
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
            r = _json_item(data, limits)
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


def _iter_wds(path: str, caption_prompt: str, limits: InputLimits = DEFAULT_LIMITS) -> Iterator[SourceRecord]:
    shard = PurePosixPath(path).name
    for i, g in enumerate(_tar_groups(path, limits)):
        fid = f"{shard}/{printable(g.key)}"
        try:
            rec, data = _wds_record(g, caption_prompt, limits)
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


def _iter_parquet(path: str, batch_rows: int = 256, span: Span | None = None) -> Iterator[SourceRecord]:
    """A Parquet file's rows; `span`: only row groups `span.start .. span.stop`, whose first row is `span.first`."""
    import pyarrow.parquet as pq

    i = 0 if span is None else span.first
    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups = None if span is None else list(range(span.start, span.stop))
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups):
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


def system_turn(rec: dict[str, Any]) -> dict[str, Any]:
    """A top-level system prompt (`system_prompt` as lmms-finetune writes it, `system` as LLaMA-Factory does)
    becomes the conversation's first turn with role `system`, as a `messages` system message does, so
    training and perplexity templates see it. The field stays in `meta` when it is not a non-empty string
    or the conversation already starts with its own system turn (nothing is overwritten)."""
    key = next((k for k in SYSTEM_FIELDS if k in rec), None)
    if key is None:
        return rec
    value, convs = rec[key], rec.get("conversations")
    if not isinstance(value, str) or not value.strip() or not isinstance(convs, list) or not convs or \
            (isinstance(convs[0], dict) and convs[0].get("from") == "system"):
        return rec
    out = {k: v for k, v in rec.items() if k != key}
    out["conversations"] = [{"from": "system", "value": value}, *convs]
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
    rec = system_turn(rec)
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


def iter_source(source: str, format: str = "auto", caption_prompt: str = DEFAULT_CAPTION_PROMPT,
                limits: InputLimits = DEFAULT_LIMITS, flagged: dict[str, dict[int, str]] | None = None
                ) -> Iterator[SourceRecord]:
    """Every record of every file of `source`, in file order, normalized to the LLaVA form; a record over
    one of `limits` comes as its problem (core/foundation/limits.py). `flagged`: what `count_records` found with the
    same limits; a JSON array it scanned without flagging an item is streamed by the fast parser."""
    container, dialect = parse_format(format)
    for path in list_source_files(source):
        kind = container if container != "auto" else detect_container(path)
        yield from iter_file(path, kind, dialect, caption_prompt, limits,
                             clean=flagged is not None and flagged.get(path) == {})


def iter_file(path: str, kind: str, dialect: str = "auto", caption_prompt: str = DEFAULT_CAPTION_PROMPT,
              limits: InputLimits = DEFAULT_LIMITS, clean: bool = False, span: Span | None = None
              ) -> Iterator[SourceRecord]:
    """The records of one file of container `kind` (normalized as `iter_source` yields them), or of the `span`
    of it (JSON array, JSONL, Parquet; a partition, core/io/partition.py): the same records, with the same
    indices and positions, as the file's whole read yields for that range. `clean`: see `_iter_json`."""
    if kind == "json":
        it = _iter_json(path, limits, clean=clean, span=span)
    elif kind == "jsonl":
        it = _iter_jsonl(path, limits, span=span)
    elif kind == "wds":
        it = _iter_wds(path, caption_prompt, limits)
    else:
        it = _iter_parquet(path, span=span)
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
def count_records(source: str, format: str = "auto", limits: InputLimits = DEFAULT_LIMITS,
                  flagged: dict[str, dict[int, str]] | None = None) -> dict[str, int]:
    """Records per file, counted without the parsers: JSON arrays by a byte-level scan of top-level items,
    JSONL by non-blank lines, WDS by consecutive member-key groups in the tar headers (+1 for an unreadable
    tail), Parquet by the row counts in the file footers. Raises SourceError where a JSON array's items
    cannot be delimited (naming the byte offset). `limits` bound the scan's memory as they bound the
    readers' (and must be the readers', so both delimit the same items). `flagged`, when given, receives
    per JSON array file {item index: error} for the items over a bound (`split_json_array`), and at -1 a
    run of more digits than `max_int_digits` somewhere in the file (only the bounded parser checks ints)."""
    container, _ = parse_format(format)
    out: dict[str, int] = {}
    for path in list_source_files(source):
        kind = container if container != "auto" else detect_container(path)
        out[path] = count_file(path, kind, limits, flagged)
    return out


def count_file(path: str, kind: str, limits: InputLimits = DEFAULT_LIMITS,
               flagged: dict[str, dict[int, str]] | None = None) -> int:
    """The records of one file of container `kind`, counted without the parsers (`count_records`)."""
    import pyarrow.parquet as pq

    n = 0
    with fsspec.open(path, "rb") as f:
        if kind == "json":
            try:
                bad: dict[int, str] = {}
                watch = _DigitWatch(f, limits.max_int_digits)
                for idx, _, _, err in split_json_array(watch, keep_bytes=False, max_depth=limits.max_json_depth,
                                                       max_item_bytes=limits.max_record_bytes):
                    n += 1
                    if err:
                        bad[idx] = err
                if watch.found:  # -1: the file as a whole is for the bounded path
                    bad[-1] = f"a run of more than max_int_digits={limits.max_int_digits} digits"
                if flagged is not None:
                    flagged[path] = bad
            except SourceError as e:
                raise SourceError(f"{path}: {e}") from None
        elif kind == "jsonl":
            for _ in iter_lines(f, limits.max_record_bytes):
                n += 1
        elif kind == "wds":
            last = None
            try:
                with tarfile.open(fileobj=f, mode="r|") as tar:
                    for m in tar:
                        if not m.isdir():  # as _tar_groups: every other member belongs to a group
                            key = _wds_split(m.name)[0]
                            n += key != last
                            last = key
            except (tarfile.TarError, EOFError, OSError):
                n += 1  # the `__truncated__` marker row
        else:
            n = pq.ParquetFile(f).metadata.num_rows
    return n
