"""Synthetic data the project makes itself (no downloads), for the demo, the tests and the benchmarks.

- `dataset`: the LLaVA-style demo dataset with planted defects and its ground truth (`python -m core.demo`);
  its public names are re-exported here, so `from core.demo import generate_demo` keeps working.
- `scenes`: the drawn images (charts, counted shapes, documents, "photos") and their Q&A.
- `score`: a curation run of the demo scored against the ground truth (`python -m core.demo.score`).
- `eval_fixtures`: tiny benchmark caches in each benchmark's published layout (`write_fixtures`).
- `embeddings`: clustered embedding matrices with planted duplicates (dedup tests and benchmarks).
"""

from core.demo.dataset import (
    CORRUPT_KINDS,
    DOMAINS,
    MIN_SAMPLES,
    SOURCES,
    DefectRates,
    DemoInfo,
    clean_messages,
    clean_records,
    clean_texts,
    conversation_text,
    generate_demo,
    load_ground_truth,
    load_records,
    main,
    plant_eval_contamination,
    to_messages,
)

__all__ = [
    "CORRUPT_KINDS",
    "DOMAINS",
    "MIN_SAMPLES",
    "SOURCES",
    "DefectRates",
    "DemoInfo",
    "clean_messages",
    "clean_records",
    "clean_texts",
    "conversation_text",
    "generate_demo",
    "load_ground_truth",
    "load_records",
    "main",
    "plant_eval_contamination",
    "to_messages",
]
