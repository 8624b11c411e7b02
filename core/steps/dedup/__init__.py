"""Semantic dedup (SemDeDup), eval mining and decontamination."""
