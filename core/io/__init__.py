"""Input/output: images, sources and ingest, WebDataset tars, publishing."""
