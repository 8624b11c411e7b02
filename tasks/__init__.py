"""Thin Flyte task wrappers: one module per stage; each turns Flyte types into paths and calls core."""
