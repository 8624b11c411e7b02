"""Token-savings report of a rephrase run: JSON numbers and a Deck/HTML page with plots and examples."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.foundation.ledger import read_ledger, step_dir
from core.foundation.report import figure_html, new_figure, page, table_html, text_html
from core.steps.rephrase.step import STEP

LOW_ACCEPTANCE = 0.2


def _stats(x: np.ndarray) -> dict[str, float | None]:
    if len(x) == 0:
        return {k: None for k in ("mean", "median", "min", "max", "std", "total")}  # JSON-safe, unlike NaN
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "min": float(x.min()),
        "max": float(x.max()),
        "std": float(x.std()),
        "total": float(x.sum()),
    }


def _shares(ratio: np.ndarray) -> dict[str, float]:
    n = max(len(ratio), 1)
    return {
        "shorter": float((ratio < 1).sum() / n),
        "same": float((ratio == 1).sum() / n),
        "longer": float((ratio > 1).sum() / n),
    }


def load_rows(run_dir: str | os.PathLike, passing_only: bool = True) -> Any:
    """The rephrase ledger with old/new/gen token counts unpacked from `extra` (a DataFrame).

    `passing_only` drops quarantined rows (records the reader could not parse): they have no text to
    count and would drag token statistics towards 0."""
    df = read_ledger(step_dir(run_dir, STEP))
    if passing_only:
        df = df[df["decision"].isin(["keep", "modify"])].reset_index(drop=True)
    extra = [json.loads(e) if e else {} for e in df["extra"]]
    for k in ("old_tokens", "new_tokens", "gen_tokens"):
        df[k] = [int(e.get(k, 0)) for e in extra]
    return df


def load_examples(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    for p in sorted((Path(run_dir) / STEP / "examples").glob("part-*.jsonl")):
        out.extend(json.loads(line) for line in p.read_text("utf-8").splitlines() if line.strip())
    return out


def summarize(run_dir: str | os.PathLike, model: str = "", tokenizer: str = "") -> dict[str, Any]:
    """Numbers of the report: token stats before/after (training tokenizer), ratios, shares,
    acceptance per reason, and an honest verdict when the model's rephrasings are mostly rejected."""
    df = load_rows(run_dir)
    quarantined = load_rows(run_dir, passing_only=False)
    quarantined = quarantined[quarantined["decision"] == "quarantine"]
    n = len(df)
    old = df["old_tokens"].to_numpy(float)
    new = df["new_tokens"].to_numpy(float)
    modified = (df["decision"] == "modify").to_numpy()
    after = np.where(modified, new, old)
    generated = df["reason"].str.startswith("rephrase_rejected:").to_numpy() | modified
    with np.errstate(divide="ignore", invalid="ignore"):
        final_ratio = np.where(old > 0, after / np.maximum(old, 1), 1.0)
        cand_ratio = np.where(old > 0, new / np.maximum(old, 1), 1.0)[generated]
    reasons = df["reason"].value_counts()
    acceptance = float(modified.sum() / n) if n else 0.0
    n_gen = int(generated.sum())
    out: dict[str, Any] = {
        "model": model,
        "tokenizer": tokenizer,
        "n_samples": n,
        "n_quarantined": int(len(quarantined)),
        "quarantine_reasons": {str(k): int(v) for k, v in quarantined["reason"].value_counts().items()},
        "n_rephrased_candidates": n_gen,
        "n_modified": int(modified.sum()),
        "acceptance_rate": acceptance,
        "acceptance_rate_of_candidates": float(modified.sum() / n_gen) if n_gen else 0.0,
        "reasons": {str(k): {"count": int(v), "share": float(v / n)} for k, v in reasons.items()},
        "tokens_before": _stats(old),
        "tokens_after": _stats(after),
        "token_saving": float(1 - after.sum() / old.sum()) if old.sum() else 0.0,
        "ratio_final": _stats(final_ratio),
        "ratio_accepted": _stats(final_ratio[modified]),
        "ratio_candidates": _stats(cand_ratio),
        "share_final": _shares(final_ratio),
        "share_candidates": _shares(cand_ratio),
        "generated_tokens": int(df["gen_tokens"].sum()),
    }
    if n_gen and out["acceptance_rate_of_candidates"] < LOW_ACCEPTANCE:
        top = max(
            ((k, v["count"]) for k, v in out["reasons"].items() if k.startswith("rephrase_rejected:")),
            key=lambda kv: kv[1],
            default=("", 0),
        )
        out["verdict"] = (
            f"Validation rejected {1 - out['acceptance_rate_of_candidates']:.0%} of the model's rephrasings "
            f"(most often {top[0]}); the originals were kept. The token saving of this run "
            f"({out['token_saving']:.1%}) reflects the model's weakness, not what rephrasing can save: "
            "use a real instruct model (qwen preset) for meaningful numbers."
        )
    else:
        out["verdict"] = (
            f"{out['acceptance_rate_of_candidates']:.0%} of rephrasings accepted; "
            f"text tokens cut by {out['token_saving']:.1%} overall."
        )
    return out


def _conv_text(conv: list[dict[str, str]]) -> str:
    return "\n".join(f"[{t['from']}] {t['value']}" for t in conv)


def report_html(summary: dict[str, Any], run_dir: str | os.PathLike) -> str:
    """Deck page: verdict, stats table, ratio histogram, token histograms, reasons, before/after examples."""
    df = load_rows(run_dir)
    old = df["old_tokens"].to_numpy(float)
    new = df["new_tokens"].to_numpy(float)
    modified = (df["decision"] == "modify").to_numpy()
    generated = df["reason"].str.startswith("rephrase_rejected:").to_numpy() | modified
    after = np.where(modified, new, old)
    parts = [text_html(summary["verdict"], "Verdict")]
    if summary.get("n_quarantined"):
        parts.append(text_html(f"{summary['n_quarantined']} inputs quarantined (not counted below): "
                               f"{summary['quarantine_reasons']}", "Quarantine"))
    rows = []
    for name in ("tokens_before", "tokens_after", "ratio_final", "ratio_accepted", "ratio_candidates"):
        rows.append({"metric": name, **summary[name]})
    parts.append(table_html(rows, "Token counts (training tokenizer) and new/old ratios"))
    parts.append(
        table_html(
            [{"set": k.replace("share_", ""), **v} for k, v in summary.items() if k.startswith("share_")],
            "Share of samples shorter / same / longer (final: after validation; candidates: model output)",
        )
    )
    fig, ax = new_figure()
    safe = np.maximum(old, 1)
    bins = np.linspace(0, 2, 41)
    ax.hist(
        np.clip(new[generated & ~modified] / safe[generated & ~modified], 0, 2), bins=bins, alpha=0.6, label="rejected"
    )
    ax.hist(np.clip(new[modified] / safe[modified], 0, 2), bins=bins, alpha=0.8, label="accepted")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("new / old text tokens (clipped at 2)")
    ax.set_ylabel("samples")
    ax.legend()
    parts.append(figure_html(fig, "Ratio histogram of rephrased candidates"))
    fig, ax = new_figure()
    hi = max(float(old.max()) if len(old) else 1.0, 1.0)
    b = np.linspace(0, hi, 41)
    ax.hist(old, bins=b, alpha=0.5, label="before")
    ax.hist(after, bins=b, alpha=0.5, label="after")
    ax.set_xlabel("text tokens per sample")
    ax.legend()
    parts.append(figure_html(fig, "Tokens per sample before / after"))
    parts.append(
        table_html(
            [{"reason": k, **v} for k, v in summary["reasons"].items()],
            f"Decisions per reason (acceptance {summary['acceptance_rate']:.1%} of all samples, "
            f"{summary['acceptance_rate_of_candidates']:.1%} of rephrased candidates)",
        )
    )
    for ex in load_examples(run_dir)[:20]:
        parts.append(
            text_html(
                f"BEFORE ({ex['old_tokens']} tokens)\n{_conv_text(ex['original'])}\n\n"
                f"AFTER ({ex['new_tokens']} tokens)\n{_conv_text(ex['candidate'])}",
                f"{ex['sample_id']}: {ex['reason']}",
            )
        )
    return page(*parts)


def write_report(run_dir: str | os.PathLike, model: str = "", tokenizer: str = "") -> tuple[Path, Path, dict[str, Any]]:
    """Write `<run>/rephrase/report.json` and `report.html`; return both paths and the summary."""
    out = Path(run_dir) / STEP
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(run_dir, model, tokenizer)
    jp, hp = out / "report.json", out / "report.html"
    jp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    hp.write_text(report_html(summary, run_dir))
    return jp, hp, summary
