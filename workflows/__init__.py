"""Flyte workflows and launch plans: wiring only, no logic."""
