"""The tiny embedded models the demo and the tests train (no downloads)."""
