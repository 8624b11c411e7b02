"""Typed training sample in the LLaVA / MAmmoTH-VL conversation format.

The on-disk (and training) schema is the LLaVA JSON record::

    {"id": "...", "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional),
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

`Sample` is the in-memory form. It is produced only through `Sample.from_record`, which validates, so
code downstream of the reader can trust every field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

IMAGE_TOKEN = "<image>"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLES = ("system",)
VALID_ROLES = HUMAN_ROLES + ASSISTANT_ROLES + SYSTEM_ROLES
MAX_TEXT_CHARS = 200_000  # one sample's total text; beyond this it is quarantined as oversize_text
# Turns per conversation; beyond this it is quarantined as too_many_turns. A turn costs several template
# tokens, so 1,000 turns overflow the 2k-32k token contexts LLaVA/MAmmoTH-VL train with long before their
# text does; real multi-turn records (LLaVA-665K's VQA-derived ones) hold tens of turns. Bounding turns
# also bounds per-turn work downstream (chat templates, assistant-token marking).
MAX_TURNS = 1000
# Top-level record fields the Sample models; any other field travels in `Sample.meta` (exported as "meta").
KNOWN_FIELDS = frozenset({"id", "image", "images", "conversations", "source", "domain", "metadata", "meta"})
# Modalities the pipeline cannot carry: a record with one is quarantined `unsupported_modality:<kind>`
# rather than exported as a text-only sample with a dangling placeholder.
UNSUPPORTED_MODALITIES = {"video": ("video", "videos", "<video>"), "audio": ("audio", "audios", "<audio>")}

_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")  # fullmatch: `$` would accept a trailing newline
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # NUL and control characters: never in an id or a file name


class SampleError(ValueError):
    """A record that cannot become a Sample. `reason` is the short ledger code (e.g. `role_broken`)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Turn:
    """One conversation turn: `role` is the LLaVA `from` field (human/gpt/system), `value` its text."""

    role: str
    value: str

    @property
    def is_human(self) -> bool:
        return self.role in HUMAN_ROLES

    @property
    def is_assistant(self) -> bool:
        return self.role in ASSISTANT_ROLES


@dataclass
class Sample:
    """A validated conversation sample.

    `images` are the image names of the record (file names in the source folder, or WDS member
    suffixes); `image_bytes`, when loaded, holds the encoded bytes in the same order. `domain` is the
    record's data domain (chart, document, ...; "" when unknown), used to mix data by domain; `meta`
    holds the record's unknown top-level fields, exported unchanged as a "meta" object.
    """

    id: str
    conversations: list[Turn]
    images: list[str] = field(default_factory=list)
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    domain: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    image_bytes: list[bytes] = field(default_factory=list, repr=False, compare=False)
    shard: str = field(default="", compare=False)  # name of the shard it was read from (not exported)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_record(cls, record: Any, source: str = "", max_text_chars: int = MAX_TEXT_CHARS,
                    max_turns: int = MAX_TURNS) -> Sample:
        """Validate a LLaVA-style dict and build a Sample; raises `SampleError` with a reason code."""
        if not isinstance(record, dict):
            raise SampleError("invalid_json", f"record is {type(record).__name__}, not an object")
        _check_modalities(record)
        convs = record.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise SampleError("empty_conversation", "missing or empty 'conversations'")
        if len(convs) > max_turns:  # before any per-turn work
            raise SampleError("too_many_turns", f"{len(convs)} turns > max_turns={max_turns}")
        turns: list[Turn] = []
        total = 0
        for i, t in enumerate(convs):
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                raise SampleError("role_broken", f"turn {i} is not {{from, value: str}}")
            role = t.get("from")
            if role not in VALID_ROLES:
                raise SampleError("role_broken", f"turn {i} has role {role!r}")
            total += len(t["value"])
            turns.append(Turn(role, t["value"]))
        if total > max_text_chars:
            raise SampleError("oversize_text", f"{total} chars > {max_text_chars}")
        _check_roles(turns)
        images = record.get("image", record.get("images"))
        if images is None:
            images = []
        elif isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
            raise SampleError("invalid_json", "'image' must be a string or a list of strings")
        for name in images:
            if _CONTROL.search(name):
                raise SampleError("unsafe_path", f"image name {name!r} has a NUL or control character")
        n_tokens = sum(t.value.count(IMAGE_TOKEN) for t in turns)
        if n_tokens != len(images):
            raise SampleError("image_count_mismatch", f"{n_tokens} <image> placeholders, {len(images)} images")
        sid = record.get("id")
        if sid is None or (isinstance(sid, str) and not sid.strip()):
            sid = content_id(turns, images)
        elif not isinstance(sid, (str, int)):
            raise SampleError("invalid_json", f"id has type {type(sid).__name__}")
        sid = _checked_id(sid)
        meta = record.get("metadata") or {}
        if not isinstance(meta, dict):
            raise SampleError("invalid_json", "'metadata' must be an object")
        extra = record.get("meta") or {}
        if not isinstance(extra, dict):
            raise SampleError("invalid_json", "'meta' must be an object")
        extra = dict(extra) | {k: v for k, v in record.items() if k not in KNOWN_FIELDS}
        domain = record.get("domain")
        if domain is not None and not isinstance(domain, (str, int)):
            raise SampleError("invalid_json", f"'domain' has type {type(domain).__name__}")
        return cls(
            id=sid,
            conversations=turns,
            images=list(images),
            source=str(record.get("source") or source),
            metadata=meta,
            domain=str(domain or ""),
            meta=extra,
        )

    # ---- views --------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """WebDataset key: the id when it is dot-free and safe, else a sanitized id plus a hash."""
        return sample_key(self.id)

    def to_record(self) -> dict[str, Any]:
        """The LLaVA training-schema dict (what the WDS `key.json` holds)."""
        rec: dict[str, Any] = {
            "id": self.id,
            "conversations": [{"from": t.role, "value": t.value} for t in self.conversations],
        }
        if len(self.images) == 1:
            rec["image"] = self.images[0]
        elif self.images:
            rec["image"] = list(self.images)
        if self.source:
            rec["source"] = self.source
        if self.domain:
            rec["domain"] = self.domain
        if self.metadata:
            rec["metadata"] = self.metadata
        if self.meta:
            rec["meta"] = self.meta
        return rec

    def to_json_bytes(self) -> bytes:
        """Canonical JSON encoding (sorted keys, UTF-8) so that shards are byte-reproducible."""
        return json.dumps(self.to_record(), ensure_ascii=False, sort_keys=True).encode("utf-8")

    def human_texts(self) -> list[str]:
        return [t.value for t in self.conversations if t.is_human]

    def assistant_texts(self) -> list[str]:
        return [t.value for t in self.conversations if t.is_assistant]

    def text(self, which: str = "first_human", strip_image_tokens: bool = True) -> str:
        """Text view used by embedders and scorers: `first_human`, `all_human` or `all` turns."""
        if which == "first_human":
            parts = self.human_texts()[:1]
        elif which == "all_human":
            parts = self.human_texts()
        elif which == "all":
            parts = [t.value for t in self.conversations]
        else:
            raise ValueError(f"unknown text view {which!r} (first_human, all_human, all)")
        out = "\n".join(parts)
        return strip_image_placeholders(out) if strip_image_tokens else out


def strip_image_placeholders(text: str) -> str:
    """Remove `<image>` placeholders together with the newline LLaVA puts after/before them."""
    text = re.sub(r"<image>\n?", "", text)
    return re.sub(r"\n?<image>", "", text).strip()


def _check_modalities(record: dict[str, Any]) -> None:
    """Raise `unsupported_modality:<kind>` for a record carrying video or audio (a field or a placeholder)."""
    texts = [t.get("value") for t in record.get("conversations") or [] if isinstance(t, dict)]
    for kind, (field_, plural, token) in UNSUPPORTED_MODALITIES.items():
        if record.get(field_) or record.get(plural):
            raise SampleError(f"unsupported_modality:{kind}", f"record has a {field_!r} field")
        if any(isinstance(v, str) and token in v for v in texts):
            raise SampleError(f"unsupported_modality:{kind}", f"a turn contains {token}")


def _check_roles(turns: list[Turn]) -> None:
    body = [t for t in turns if t.role not in SYSTEM_ROLES]
    if any(t.role in SYSTEM_ROLES for t in turns[1:]) and turns[0].role not in SYSTEM_ROLES:
        raise SampleError("role_broken", "system turn after the first turn")
    if len(body) < 2:
        raise SampleError("empty_conversation", f"{len(body)} non-system turns; need a question and an answer")
    for i, t in enumerate(body):
        want_human = i % 2 == 0
        if t.is_human != want_human:
            raise SampleError("role_broken", f"turn {i} is {t.role!r}; roles must alternate human/gpt")
    if not body[-1].is_assistant:
        raise SampleError("role_broken", "conversation ends on a human turn")
    if any(not t.value.strip() for t in body):
        raise SampleError("empty_conversation", "a turn has empty text")


def _checked_id(sid: str | int) -> str:
    """The id as a string; SampleError(bad_id) for an id with a NUL or control character (a trailing
    newline would reach tar member names and ledger keys) or an integer too long for `str()`."""
    try:
        text = str(sid)
    except ValueError as e:  # Python's int->str digit limit (4,300 digits)
        raise SampleError("bad_id", f"integer id: {e}") from None
    if _CONTROL.search(text):
        raise SampleError("bad_id", f"id {text[:200]!r} has a NUL or control character")
    return text


def content_id(turns: list[Turn], images: list[str]) -> str:
    """Stable id for records without one: a hash of the conversation and image names."""
    h = hashlib.sha256()
    for t in turns:
        h.update(t.role.encode() + b"\0" + t.value.encode("utf-8", "surrogatepass") + b"\0")
    for name in images:
        h.update(b"img\0" + name.encode("utf-8", "surrogatepass"))
    return "h" + h.hexdigest()[:24]


def sample_key(sample_id: str) -> str:
    """Map a sample id to a WDS key (no dots, no slashes). Injective: unsafe ids get a hash suffix."""
    if _SAFE_KEY.fullmatch(sample_id):
        return sample_id
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", sample_id)[:80].strip("_") or "k"
    return f"{clean}-{hashlib.sha1(sample_id.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
