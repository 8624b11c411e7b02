"""Each task's decks as a standalone page in its own output directory, so runs can collect and list them.

Local execution writes flytekit's deck.html only under a random sandbox folder that nothing names; a cluster
keeps it beside the task's outputs in the blob store. `save_decks` also writes `<out_dir>/decks/<step>.html`,
which travels with the task's output directory; the run summary (tasks/run_report.py) and the ablation table
(tasks/ablation.py) copy these pages to `<output_dir>/decks/` (`core.io.publish.publish`) and print their paths.

One page holds one step. flytekit keeps decks in a list of the execution context that every task of a local
run shares (a pod on a cluster starts empty), so without a bound `embed.html` repeated ingest's deck and the run
summary's page held every step's, some twice. `begin_decks` (called by `tasks.steplog.step_started`, the first
line of every step's task body) marks the decks that exist before the step; `save_decks` writes only the ones
made after that mark.
"""

from __future__ import annotations

import logging
from typing import Any

from flytekit import current_context
from flytekit.deck import DeckField

log = logging.getLogger(__name__)

# The default decks flytekit adds to a deck-enabled task, less `Dependencies`: that one runs `pip list` and
# `pip freeze` in subprocesses on every task (4-4.5 s per task under load, ~33 tasks per demo); the step pages
# are ours (`save_decks`) and the image pins say what is installed.
DECK_FIELDS = (DeckField.SOURCE_CODE, DeckField.TIMELINE, DeckField.INPUT, DeckField.OUTPUT)

# Deck objects that existed when the running step began (identity, not name: two runs of a step in one
# process make decks of the same name). Held, not just their ids, so an id is never reused while marked.
_before: list[Any] = []


def begin_decks() -> None:
    """Mark where the running step's decks start: every deck already in the context belongs to earlier tasks."""
    _before[:] = list(current_context().decks)


def own_decks() -> list[Any]:
    """The decks the running step made since `begin_decks`, flytekit's own (inputs, outputs, timeline,
    source) left out."""
    from flytekit.deck.deck import DeckField

    builtin = {f.value for f in DeckField}
    seen = {id(d) for d in _before}
    return [d for d in current_context().decks if id(d) not in seen and d.name not in builtin]


def save_decks(out_dir: str, step: str) -> str:
    """Write the decks this step made (since its `step_started`) as `<out_dir>/decks/<step>.html`.

    :param out_dir: The task's output directory (path or fsspec URL).
    :param step: Page name, usually the step (ingest, embed, semdedup, ...).
    :return: The page's path or URL.
    """
    import fsspec

    from core.foundation.report import DECKS_DIR, deck_page

    sections = [(d.name, d.html) for d in own_decks()]
    path = f"{out_dir.rstrip('/')}/{DECKS_DIR}/{step}.html"
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(root, "w", encoding="utf-8") as f:
        f.write(deck_page(f"mmcurate {step}", sections))
    log.debug("deck page %s (%d sections)", path, len(sections))
    return path
