"""Choices and config loading shared by every stage.

- Configs are dataclasses that cross Flyte task boundaries whole; on the command line they are JSON.
- `load_config(cls, data, preset)` merges a partial JSON/dict onto a preset, rejects unknown keys (listing the
  valid ones, with a did-you-mean), and wraps the dataclass's own validation so the message names the class,
  the field and its valid range. It is driven by the dataclass fields, so a new field needs no change here.
- `ConfigJSON` gives a config dataclass the `from_json` that `pyflyte run --<config> '{...}'` calls: the JSON
  on the command line is loaded with `load_config` onto the class's default preset.
- One preset registry for every stage config: `@register_preset(EmbedConfig, "tiny", default=True)` on a
  function returning the config; `preset(EmbedConfig, "tiny", **changes)` builds it; `preset_names(cls)`.
- One override rule, `override(cfg, **changes)` (the same rule as `load_config` and the CLI JSON):
  every given key replaces its field, `None` included (None is a value of an optional field, never "keep");
  unknown keys are rejected with a did-you-mean; a nested config field takes a dict (merged onto its current
  value by this same rule) or a preset name of its class; a `"preset": "<name>"` key in a dict (CLI JSON
  included) makes that registered preset the base instead; a class's `_merge_onto` resolves fields that exclude
  each other (eps vs target_removal); the result is validated again by the class.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import typing
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot be built: unknown or missing keys, or a value out of range."""


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, allow_none: bool = False) -> None:
    """Raise ValueError `name=value out of range; valid: [lo, hi)` unless lo <= value <= hi (open ends per flag).

    The message format every config dataclass uses, so a user reads the field and its range in one line.
    """
    if value is None and allow_none:
        return
    ok = value is not None and not (isinstance(value, float) and value != value)  # NaN is never in range
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name}={value!r} out of range; valid: {left}{lo_s}, {hi_s}{right}{extra}")


def check_ranges(obj: Any, ranges: dict[str, tuple]) -> None:
    """`check_range` for several fields of `obj`: {field: (lo, hi)} or (lo, hi, {flags})."""
    for name, spec in ranges.items():
        lo, hi, *flags = spec
        check_range(name, getattr(obj, name), lo, hi, **(flags[0] if flags else {}))


C = TypeVar("C")


def _read(data: Any) -> dict:
    if data is None:
        return {}
    if isinstance(data, dict):
        return dict(data)
    if isinstance(data, str):
        text = data
        if not data.lstrip().startswith("{") and os.path.isfile(data):
            with open(data) as f:
                text = f.read()
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not a JSON object (or a path to one): {e}") from None
        if not isinstance(out, dict):
            raise ConfigError(f"expected a JSON object of config fields, got {type(out).__name__}")
        return out
    raise ConfigError(f"expected a dict, a JSON object or a path, got {type(data).__name__}")


def load_config(cls: type[C], data: Any = None, preset: C | None = None) -> C:
    """Build `cls` from `data` (dict, JSON text or a JSON file path) merged onto `preset`.

    Unknown keys are rejected with the valid ones listed; keys missing from `data` come from `preset` (or the
    field defaults when there is none; a `"preset": "<name>"` key in `data` picks a registered preset instead); a
    required field missing from both is named. A class may define
    `_merge_onto(base: dict, data: dict) -> dict` for fields that exclude each other (e.g. eps vs
    target_removal). The class's own validation (__post_init__ / validate) runs, its message is kept.
    """
    name = cls.__name__
    values = _read(data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for old, new in getattr(cls, "_renamed", {}).items():  # keys renamed in a release: still read, with a warning
        if old in values:
            top, _, sub = new.partition(".")  # "export_config.max_samples": moved into a nested config
            if (sub and sub in (values.get(top) or {})) or (not sub and new in values):
                raise ConfigError(f"{name}: both {old!r} and its new name {new!r} given; keep {new!r}")
            log.warning("%s: key %r is now %r (the old name is read for now)", name, old, new)
            if sub:
                nested = values.get(top)
                values[top] = {**(nested if isinstance(nested, dict) else {}), sub: values.pop(old)}
            else:
                values[new] = values.pop(old)
    if "preset" in values and "preset" not in fields:  # {"preset": "siglip2", ...}: that preset is the base
        preset = _registered(cls, values.pop("preset"))
    unknown = [k for k in values if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            # match the whole name or one of its words (`tagret` -> target_removal)
            words = {w: f for f in fields for w in [f, *f.split("_")]}
            close = [words[w] for w in difflib.get_close_matches(k, list(words), n=1, cutoff=0.6)]
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{name}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(fields)}")
    base = {f: getattr(preset, f) for f in fields} if preset is not None else {}
    values = _nested(cls, values, base)
    merge = getattr(cls, "_merge_onto", None)
    merged = merge(base, values) if merge else {**base, **values}
    missing = [f for f, spec in fields.items() if f not in merged and spec.default is dataclasses.MISSING
               and spec.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{name}: missing required key(s) {missing} (no preset to take them from)")
    try:
        return cls(**merged)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None


def _nested(cls: type, values: dict, base: dict) -> dict:
    """Values of nested config fields: a dict merges onto the current value (or the class's default preset),
    a str names a preset of the field's class; an int for a float field becomes a float; others pass through."""
    out = dict(values)
    hints = typing.get_type_hints(cls) if values else {}
    for k, v in values.items():
        if type(v) is int and hints.get(k) in (float, float | None):  # JSON `80` for a float field: 80.0
            out[k] = float(v)
        if not isinstance(v, (dict, str)):
            continue
        sub = _config_class(hints.get(k))
        if sub is None:
            continue
        if isinstance(v, str):
            out[k] = preset(sub, v)
        else:
            current = base.get(k)
            out[k] = load_config(sub, v, current if current is not None else default_preset(sub))
    return out


def _config_class(tp: Any) -> type | None:
    """The dataclass of a field annotated `X` or `Optional[X]` (None for other types)."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


# ---- the preset registry: {config class: {name: function returning a config}}
_PRESETS: dict[type, dict[str, Callable[[], Any]]] = {}
_DEFAULT: dict[type, str] = {}


def register_preset(cls: type, name: str, *, default: bool = False) -> Callable:
    """Decorator: register a function returning a `cls` config as preset `name` (called with no arguments).
    `default=True` makes it the preset a partial CLI JSON merges onto (`ConfigJSON.from_json`)."""

    def deco(fn: Callable) -> Callable:
        _PRESETS.setdefault(cls, {})[name] = fn
        if default:
            _DEFAULT[cls] = name
        return fn

    return deco


def preset_names(cls: type) -> list[str]:
    """The registered preset names of a config class, in registration order."""
    return list(_PRESETS.get(cls, {}))


def preset(cls: type[C], name: str, **changes: Any) -> C:
    """Preset `name` of `cls` with `changes` applied by the one override rule (`override`)."""
    cfg = _registered(cls, name)
    return override(cfg, **changes) if changes else cfg


def _registered(cls: type[C], name: str) -> C:
    table = _PRESETS.get(cls, {})
    if name not in table:
        raise ConfigError(f"{cls.__name__}: unknown preset {name!r}; valid: {', '.join(table) or 'none registered'}")
    return table[name]()


def default_preset(cls: type[C]) -> C | None:
    """The class's default preset (`register_preset(..., default=True)`), or None."""
    name = _DEFAULT.get(cls)
    return preset(cls, name) if name else None


def override(cfg: C, **changes: Any) -> C:
    """A copy of `cfg` with `changes`: THE override rule of every config (see the module docstring).

    Each key replaces its field, None included; unknown keys are rejected; nested configs take a dict
    (merged) or a preset name; the class validates the result.
    """
    return load_config(type(cfg), changes, cfg)


class ConfigJSON:
    """Mixin: `from_json` for the command line (`pyflyte run ... --dedup_config '{"eps": 0.05}'`).

    The JSON is merged onto the class's default preset (`register_preset(..., default=True)`); without one,
    onto the field defaults.
    """

    @classmethod
    def from_json(cls, text: str, **_: Any):
        return load_config(cls, text, default_preset(cls))
