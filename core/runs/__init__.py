"""Whole runs: the step table, curate/ablate configs, the run summary and report, checks, ablation."""
