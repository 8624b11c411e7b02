"""A per-sample filter on the shard-step contract: a subclass says only what to decide about one sample.

datatrove's `filters/base_filter.py` idea (a filter implements `filter(doc)`, the base streams, counts and writes
the exclusions), on `core.foundation.step.ShardStep` (resume by ledger part, the previous step's ids only,
missing ids quarantined, one writer per folder, a stamp of config + code)::

    class AnswerLength(SampleFilter):
        name = "answer_len"                      # the step's one name: ledger/answer_len/, registry key
        config_class = AnswerLengthConfig        # its config dataclass (presets via register_preset)
        def decide(self, sample):                # -> (decision, reason, score)
            n = len(sample.conversations[-1].value)
            return ("keep", "", n) if n <= self.config.max_chars else ("drop", "answer_too_long", n)

The base reads each unit (with image bytes loaded and every image fully decoded once, one at a time, when the class
sets `needs_images`: a sample with an undecodable image is quarantined as `corrupt_image`, a pixel bomb as
`decompression_bomb` (`core.io.images.decode_image`, the reader's own check), before `decide` sees it; `decide`
then has `self.image_sizes(sample)` for free), writes exactly one ledger row per input sample, and never
lets `decide` sink the job: a `SampleError` it raises quarantines the sample with that error's reason, any other
exception (or a malformed verdict) quarantines it as `filter_error:<ExcType>` with the message in the row's
detail. Nothing is dropped silently: every row names its reason.

Every concrete subclass (one with a `name`) is registered by that name; `filter_class(name)` finds it, importing
every module of this package first (`filter_modules`), so a new filter module is found without a list to edit.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import pkgutil
from collections.abc import Sequence
from typing import Any, ClassVar

from core.foundation.configs import default_preset, load_config
from core.foundation.ledger import LedgerWriter
from core.foundation.sample import Sample, SampleError
from core.foundation.step import Passing, ShardStep, Unit
from core.io.images import DEFAULT_MAX_PIXELS, decode_image

log = logging.getLogger(__name__)

Verdict = tuple[str, str, float | None]  # (decision, reason, score)
FILTER_DECISIONS = ("keep", "drop", "quarantine")  # a filter never rewrites a sample, so never `modify`
ERROR_PREFIX = "filter_error"

FILTERS: dict[str, type[SampleFilter]] = {}  # step name -> filter class (every concrete subclass)


class FilterResultError(ValueError):
    """`decide` returned something that is not a valid (decision, reason, score) verdict."""


class SampleFilter(ShardStep):
    """Base of a per-sample filter. Subclasses set `name` and `config_class` and implement `decide(sample)`.

    :param out: the step's output directory (receives `ledger/<name>/`).
    :param config: an instance of `config_class`; None takes its default preset (or its field defaults).
    :param prev: the previous step's passing ids, or None for every sample of the units.
    """

    config_class: ClassVar[type | None] = None
    needs_images: ClassVar[bool] = False  # True: each image decoded (and its size kept) before `decide`
    max_pixels: ClassVar[int] = DEFAULT_MAX_PIXELS  # an image above it is quarantined as decompression_bomb

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not cls.name:  # an abstract intermediate class
            return
        old = FILTERS.get(cls.name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"filter name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
        FILTERS[cls.name] = cls  # the same class defined again (a module reload) replaces itself

    def __init__(self, out: str | os.PathLike, config: Any = None, prev: Passing | None = None):
        super().__init__(out, prev)
        self.config = config if config is not None else default_config(type(self))
        self.errors: dict[str, int] = {}  # filter_error reasons seen by this object (logged once per type)
        self._sizes: tuple[Sample, list[tuple[int, int]]] | None = None  # the sample being decided, its sizes

    def decide(self, sample: Sample) -> Verdict:
        """(decision, reason, score) for one sample: decision keep | drop | quarantine; drop and quarantine
        need a reason (snake_case); score a number or None."""
        raise NotImplementedError

    def image_sizes(self, sample: Sample) -> list[tuple[int, int]]:
        """(width, height) of each image of the sample being decided, in `sample.images` order ([] for a text-only
        sample), measured when the base decoded it. Needs `needs_images = True`."""
        if self._sizes is None or self._sizes[0] is not sample:
            raise ValueError(f"{self.name}: images of {sample.id} were not decoded: set needs_images = True")
        return self._sizes[1]

    # -- the contract ---------------------------------------------------------------------------------------
    def decoded(self, sample: Sample, led: LedgerWriter, shard: str) -> bool:
        """Decode the sample's images one at a time (memory: one image), keeping their sizes; False (and the
        sample quarantined with the decoder's reason) when one cannot be decoded."""
        sizes = []
        for i, data in enumerate(sample.image_bytes):
            try:
                sizes.append(decode_image(data, self.max_pixels).size)
            except SampleError as e:
                log.warning("quarantine %s (%s): %s image %d %s", sample.id, shard, e.reason, i, e.detail[:200])
                led.add(sample.id, "quarantine", e.reason, shard=shard, detail=f"image {i}: {e.detail}"[:500])
                return False
        self._sizes = (sample, sizes)
        return True

    def verdict(self, sample: Sample) -> tuple[str, str, float | None, dict[str, Any]]:
        """`decide` checked: (decision, reason, score, extra), never raising for a sample."""
        try:
            out = self.decide(sample)
            if not isinstance(out, tuple) or len(out) != 3:
                raise FilterResultError(f"decide returned {out!r}, not (decision, reason, score)")
            decision, reason, score = out
            if decision not in FILTER_DECISIONS:
                raise FilterResultError(f"decision {decision!r} not in {FILTER_DECISIONS}")
            if not isinstance(reason, str) or (decision != "keep" and not reason):
                raise FilterResultError(f"a {decision} needs a reason string, got {reason!r}")
            if score is not None:
                score = float(score)
                if math.isnan(score):
                    raise FilterResultError("score is NaN")
            return decision, reason, score, {}
        except SampleError as e:  # bad input the filter recognised: its own reason
            return "quarantine", e.reason or f"{ERROR_PREFIX}:SampleError", None, {"detail": e.detail[:500]}
        except Exception as e:  # noqa: BLE001 -- a filter bug costs the sample a quarantine row, not the job
            reason = f"{ERROR_PREFIX}:{type(e).__name__}"
            if reason not in self.errors:
                log.warning("%s: decide raised on sample %s; quarantined as %s", self.name, sample.id, reason,
                            exc_info=True)
            self.errors[reason] = self.errors.get(reason, 0) + 1
            return "quarantine", reason, None, {"detail": f"{type(e).__name__}: {e}"[:500]}

    def process(self, unit: Unit, led: LedgerWriter) -> dict[str, int]:
        """One row per input sample of the unit (the reader's quarantines included). Returns the unit's counts."""
        n = errors = 0
        for s in self.read(unit, led, load_images=self.needs_images, verify_images=False):
            if self.needs_images and not self.decoded(s, led, unit.name):
                continue
            decision, reason, score, extra = self.verdict(s)
            led.add(s.id, decision, reason, score, shard=unit.name, **extra)
            n += 1
            errors += reason.startswith(f"{ERROR_PREFIX}:")
        if errors and errors == n:  # a bug, not bad data: still one row per sample, but said loudly
            log.error("%s: decide failed on all %d samples of %s (%s)", self.name, n, unit.name, self.errors)
        return {"decided": n, "filter_errors": errors}


# ---- the registry and the one entry point --------------------------------------------------------------
def filter_modules() -> list[str]:
    """Dotted names of every module of this package (where filters live), sorted."""
    pkg = __name__.rsplit(".", 1)[0]
    path = [os.path.dirname(__file__)]
    return sorted(f"{pkg}.{m.name}" for m in pkgutil.iter_modules(path) if not m.ispkg)


def filter_class(name: str) -> type[SampleFilter]:
    """The registered filter called `name` (every module of this package imported first)."""
    for m in filter_modules():
        importlib.import_module(m)
    if name not in FILTERS:
        raise ValueError(f"no sample filter named {name!r}; registered: {', '.join(sorted(FILTERS)) or 'none'}")
    return FILTERS[name]


def default_config(cls: type[SampleFilter]) -> Any:
    """The filter's default config: its config class's default preset, else the field defaults (None when it
    has no config class)."""
    if cls.config_class is None:
        return None
    return default_preset(cls.config_class) or cls.config_class()


def filter_config(cls: type[SampleFilter], config: Any = None) -> Any:
    """A config for `cls` from an instance, a dict, JSON text or None/"" (the default preset), merged onto the
    default preset by the one override rule (unknown keys rejected with a did-you-mean)."""
    if cls.config_class is None:
        if config not in (None, "", {}):
            raise ValueError(f"filter {cls.name!r} takes no config, got {config!r}")
        return None
    if isinstance(config, cls.config_class):
        return config
    return load_config(cls.config_class, None if config in (None, "") else config, default_config(cls))


def config_json(config: Any) -> str:
    """A config as canonical JSON (sorted keys): what a workflow passes to `tasks.filters.filter_samples`, so
    equal configs give equal cache keys."""
    return "" if config is None else json.dumps(dataclasses.asdict(config), sort_keys=True)


def run_filter(step: str, shards: Sequence[str], out: str | os.PathLike, config: Any = None,
               prev: Passing | None = None) -> dict[str, Any]:
    """Run the registered filter `step` over `shards` into `out` (resuming finished shards). Returns the
    run's summary (`StepSummary.as_dict()`: counts of the shards processed now) and the config used."""
    from core.runs.fanout import FanOut, StepSpec, run_fanout

    cls = filter_class(step)
    cfg = filter_config(cls, config)
    fan = getattr(cfg, "fanout", None) or FanOut()  # workers == 1: the step's own run, in this process
    summary = run_fanout(StepSpec(cls, (out, cfg, prev)), shards, fan).as_dict()
    summary["config"] = dataclasses.asdict(cfg) if cfg is not None else {}
    return summary

