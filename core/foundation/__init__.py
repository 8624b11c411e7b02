"""Foundation: the sample, the ledger, the shard step, configs, logging, reports, limits, atomic outputs."""
