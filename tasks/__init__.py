"""Thin Flyte task wrappers: one module per stage; each turns Flyte types into paths and calls core."""

from core.foundation.log import setup_logging

# Every task module imports this package: the project's log lines (one per step start/end, with counts) show in
# local runs and in task pods alike, at MMCURATE_LOG_LEVEL (default INFO).
setup_logging()
