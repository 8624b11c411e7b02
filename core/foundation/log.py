"""One logging configuration for the project's own log lines (tasks, scripts): `setup_logging()`.

flytekit configures only its own logger; without this the project's `log.info` lines never appear. Level
from MMCURATE_LOG_LEVEL (default INFO). Idempotent: a second call changes nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "mmcurate"


def setup_logging(level: str | None = None) -> logging.Logger:
    """Attach one stderr handler to the `core` and `tasks` loggers (once) and set their level."""
    lvl = (level or os.environ.get("MMCURATE_LOG_LEVEL", "INFO")).upper()
    for name in ("core", "tasks", "workflows", "scripts"):
        logger = logging.getLogger(name)
        logger.setLevel(lvl)
        if not any(getattr(h, "name", None) == _HANDLER_NAME for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.name = _HANDLER_NAME
            handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
            logger.addHandler(handler)
            logger.propagate = False
    return logging.getLogger("core")


def progress_disabled() -> bool | None:
    """tqdm's `disable` value: True under CI (CI=true) or MMCURATE_PROGRESS=0; False (forced on) with
    MMCURATE_PROGRESS=1; else None (tqdm's own rule: off when stderr is not a TTY)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("MMCURATE_PROGRESS") == "0":
        return True
    if os.environ.get("MMCURATE_PROGRESS") == "1":
        return False
    return None


def progress(iterable: Iterable[T] | None = None, *, desc: str, total: float | None = None, unit: str = "it",
             enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr for a long loop, quiet under CI and when stderr is not a TTY (`progress_disabled`).

    Use as an iterable wrapper, or without `iterable` with `.update(n)` / `.close()` (a context manager too).
    `enabled=False` silences it whatever the environment (e.g. on every rank but 0).
    """
    from tqdm import tqdm

    disable = progress_disabled() if enabled else True
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, mininterval=1.0,
                dynamic_ncols=True, file=sys.stderr, **kwargs)
