"""Data mixing by model soups: domains, per-domain experts, merged subsets ("soups") as a proxy for training on
the mixture, subset search, and the proof that the proxy ranks like real training. Flyte-free."""
