"""Deck HTML for a training run: loss and validation-loss curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def train_report_html(metrics_path: str | Path, checkpoints: list[str]) -> str:
    """Training/validation loss curves, last values, and the checkpoint list."""
    from core.foundation.report import figure_html, new_figure, page, table_html

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, ax = new_figure()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    last = {"steps": train[-1]["step"] if train else 0, "last_loss": train[-1]["loss"] if train else None,
            "last_val_loss": val[-1]["val_loss"] if val else None, "checkpoints": len(checkpoints)}
    return page(table_html([last], "training"), figure_html(fig, "loss"),
                table_html([{"checkpoint": c} for c in checkpoints], "checkpoints"))
