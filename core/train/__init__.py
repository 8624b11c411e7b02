"""Training on exported shards: the built-in minimal LLaVA trainer and an external-trainer launcher."""
