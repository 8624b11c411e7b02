"""Each task's decks as a standalone page in its own output directory, so runs can collect and list them.

Local execution writes flytekit's deck.html only under a random sandbox folder that nothing names; a cluster
keeps it beside the task's outputs in the blob store. `save_decks` also writes `<out_dir>/decks/<step>.html`,
which travels with the task's output directory; the run summary (tasks/run_report.py) and the ablation table
(tasks/ablation.py) copy these pages to `<output_dir>/decks/` (`core.publish.publish`) and print their paths.
"""

from __future__ import annotations

import logging

from flytekit import current_context

log = logging.getLogger(__name__)


def save_decks(out_dir: str, step: str) -> str:
    """Write this task's decks so far (the ones the task body made) as `<out_dir>/decks/<step>.html`.

    :param out_dir: The task's output directory (path or fsspec URL).
    :param step: Page name, usually the step (ingest, embed, semdedup, ...).
    :return: The page's path or URL.
    """
    import fsspec
    from flytekit.deck.deck import DeckField

    from core.report import DECKS_DIR, deck_page

    builtin = {f.value for f in DeckField}  # flytekit's own decks (inputs, outputs, timeline, source)
    sections = [(d.name, d.html) for d in current_context().decks if d.name not in builtin]
    path = f"{out_dir.rstrip('/')}/{DECKS_DIR}/{step}.html"
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(root, "w", encoding="utf-8") as f:
        f.write(deck_page(f"mmcurate {step}", sections))
    log.debug("deck page %s", path)
    return path

