"""Resource profiles: production tasks request GPUs; each has a CPU twin for the tiny (embedded-model) presets.

A twin is a second task over the same function body (same signature, docstring, cache version, image), with
CPU-only requests. Which one runs is decided by the workflow wiring from the run's preset (an input), never
by the machine that serializes the package, so the package states every task's resources.
"""

from __future__ import annotations

import types
from typing import Callable

from flytekit import Resources

# What a tiny preset's step needs: the embedded models run on two CPU cores.
TINY_REQUESTS = Resources(cpu="2", mem="8Gi")


def renamed(fn: Callable, name: str) -> Callable:
    """A copy of `fn` named `name` (same code, globals, defaults, annotations, docstring and module), so
    that flytekit registers it as another task and loads it back by that module attribute at run time."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__kwdefaults__ = fn.__kwdefaults__
    twin.__annotations__ = dict(fn.__annotations__)
    twin.__doc__ = fn.__doc__
    twin.__module__ = fn.__module__
    twin.__qualname__ = name
    return twin


def on_cpu(config) -> bool:
    """True when a stage config runs on CPU (the embedded tiny models of the demo and tests), so the workflow wires
    the CPU twins: an EmbedConfig with no GPU per actor; any other config with `device == "cpu"`."""
    if hasattr(config, "num_gpus"):
        return not config.num_gpus
    return getattr(config, "device", "") == "cpu"
