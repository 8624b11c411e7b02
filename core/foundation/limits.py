"""Bounds at the door: what a record, a name or a file must meet before a parser or a decoder sees it.

A hostile (or broken) input must cost one quarantine row, never the run: a 100,000-deep JSON item drove
ijson to 24 GB and a 3,000-deep one ends `json.loads` with RecursionError; a 5,000-digit integer raises
Python's ValueError (4,300-digit limit); a name with NUL ends `open` with ValueError. Each check here
raises `SampleError(reason, detail)` with the limit in the detail; the defaults are far above what real
datasets (LLaVA, MAmmoTH-VL, ShareGPT) hold, and every one is an `IngestConfig` field (docs/security.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from core.foundation.sample import MAX_TURNS, SampleError

# A LLaVA record nests 4 deep (array > record > conversations > turn); metadata of real datasets
# (boxes, OCR tokens, tables) stays well under 20. Python's json recursion gives out near 1,000.
MAX_JSON_DEPTH = 100
# Ids and counts fit int64 (19 digits); numbers longer than this are not data but an attack on int().
MAX_INT_DIGITS = 100
# One record as written to its shard's key.json (text + metadata + meta + id + image names). Equal to the
# WDS reader's bound (core/io/wds/reader.py MAX_JSON_BYTES), so a kept record is always readable downstream.
MAX_RECORD_BYTES = 8 << 20
# Encoded image bytes (a file, a tar member, a Parquet cell). 89.5 MP (the pixel limit) as a JPEG or
# PNG is far smaller; an uncompressed TIFF of that size would be 268 MB and is refused.
MAX_IMAGE_BYTES = 128 << 20

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|["\[\]{}]', re.S)  # a whole string, a lone quote, a bracket
_LB, _LC, _QUOTE = b"[{\""


@dataclass(frozen=True)
class InputLimits:
    """The door's bounds, as one value the readers take (IngestConfig carries each as its own field)."""

    max_json_depth: int = MAX_JSON_DEPTH
    max_int_digits: int = MAX_INT_DIGITS
    max_record_bytes: int = MAX_RECORD_BYTES
    max_turns: int = MAX_TURNS
    max_image_bytes: int = MAX_IMAGE_BYTES


DEFAULT_LIMITS = InputLimits()


def json_depth(raw: bytes, limit: int) -> int:
    """0 when the JSON text `raw` nests at most `limit` deep, else the deepest nesting it reaches.

    Bytes only, nothing decoded or built: strings are skipped whole by one regex match, brackets counted.
    Cheap for ordinary records: the count of `[` and `{` bytes bounds the depth from above, so the scan runs
    only when that count exceeds the limit. A quote that opens a string never closed ends the scan (a parser
    reads the rest as that string and reports it as invalid)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0
    depth = peak = 0
    for m in _TOKEN.finditer(raw):
        c = raw[m.start()]
        if c == _LB or c == _LC:
            depth += 1
            peak = max(peak, depth)
        elif c == _QUOTE:
            if m.end() - m.start() == 1:
                break  # an unterminated string
        else:
            depth -= 1
    return peak if peak > limit else 0


def check_depth(raw: bytes, limit: int) -> None:
    """SampleError(too_deep) when `raw` nests deeper than `limit` (see `json_depth`)."""
    d = json_depth(raw, limit)
    if d:
        raise SampleError("too_deep", f"JSON nesting depth {d} > max_json_depth={limit}")


@lru_cache(maxsize=16)
def _decoder(max_int_digits: int) -> json.JSONDecoder:
    def parse_int(s: str) -> int:
        n = len(s) - s.startswith("-")
        if n > max_int_digits:
            raise SampleError("oversize_int", f"an integer of {n} digits > max_int_digits={max_int_digits}")
        try:
            return int(s)
        except ValueError as e:  # Python's own digit limit, when max_int_digits is set above it
            raise SampleError("oversize_int", f"{e} (max_int_digits={max_int_digits})") from None

    return json.JSONDecoder(parse_int=parse_int)


def decode_json(text: str, max_int_digits: int = MAX_INT_DIGITS) -> Any:
    """`json.loads(text)` with integers of at most `max_int_digits` digits (else SampleError(oversize_int))."""
    if text.startswith("\ufeff"):  # as json.loads refuses it
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _decoder(max_int_digits).decode(text)


def load_json(raw: bytes, limits: InputLimits = DEFAULT_LIMITS) -> Any:
    """One JSON record's bytes -> its value, every bound checked before the parser builds anything:
    size (oversize_record), nesting (too_deep), integer digits (oversize_int); then as `json.loads` does
    (encoding detected from the bytes): UnicodeDecodeError and JSONDecodeError propagate."""
    if len(raw) > limits.max_record_bytes:
        raise SampleError("oversize_record", f"{len(raw)} bytes > max_record_bytes={limits.max_record_bytes}")
    check_depth(raw, limits.max_json_depth)
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    return _decoder(limits.max_int_digits).decode(text)


def control_chars(name: str) -> str:
    """The first NUL/control character of `name` as an escape (`\\x00`), or "" when it has none."""
    m = _CONTROL.search(name)
    return f"\\x{ord(m.group()):02x}" if m else ""


def printable(name: str) -> str:
    """`name` with control characters escaped (`\\x0a`), for ledger ids and messages."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", name)
