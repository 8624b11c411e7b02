"""Flyte workflows and launch plans: wiring only, no logic."""

import warnings

# `pyflyte run` declares every bool input as both `--x/--no_x` and `--x/--no-x` (flytekit
# clis/sdk_in_container/run.py), so click warns 5 times per bool input (semdedup, decontam, perplexity,
# rephrase) that `--x` "is used more than once". Harmless (both spellings work); silenced by its exact text.
warnings.filterwarnings("ignore", message=r"The parameter --\w+ is used more than once", category=UserWarning)


def named_workflow(fn, name: str):
    """`@workflow` over `fn` registered as `name`: one wiring function builds a GPU workflow and its CPU twin (the
    module attribute must be `name`, flytekit loads the workflow back by it)."""
    from flytekit import workflow

    fn.__name__ = fn.__qualname__ = name
    return workflow(fn)
