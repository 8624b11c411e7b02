"""The curation steps: embed, dedup (SemDeDup, decontamination), perplexity, rephrase, export."""
