"""What a filter decided, from its ledger: decision and reason counts with a few example ids, and the deck HTML.

Counted part by part (a part is one shard's rows), so memory does not grow with the run; finished shards that a
resumed run skipped are counted too, unlike `StepSummary` (which counts the shards processed by that call)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.foundation.ledger import DECISIONS
from core.foundation.report import esc

EXAMPLES = 5  # example ids kept per reason


def filter_counts(ledger_dir: str | os.PathLike, examples: int = EXAMPLES) -> dict[str, Any]:
    """{"inputs", "decisions": {decision: n}, "reasons": {reason: {"decision", "n", "examples": [[id, score]]}}}
    over every part of a step's ledger folder."""
    import pyarrow.parquet as pq

    decisions = dict.fromkeys(DECISIONS, 0)
    reasons: dict[str, dict[str, Any]] = {}
    for part in sorted(Path(ledger_dir).glob("*.parquet")):
        t = pq.read_table(part, columns=["sample_id", "decision", "reason", "score"]).to_pydict()
        for sid, d, r, sc in zip(t["sample_id"], t["decision"], t["reason"], t["score"]):
            decisions[d] = decisions.get(d, 0) + 1
            if not r:
                continue
            e = reasons.setdefault(r, {"decision": d, "n": 0, "examples": []})
            e["n"] += 1
            if len(e["examples"]) < examples:
                e["examples"].append([sid, sc])
    return {"inputs": sum(decisions.values()), "decisions": decisions,
            "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1]["n"], kv[0])))}


def filter_report_html(step: str, counts: dict[str, Any], config: dict[str, Any] | None = None) -> str:
    """The filter's deck: its config, the decision counts and each reason with example ids (all data escaped)."""
    n = counts["inputs"] or 1
    dec = "".join(f"<tr><td>{esc(d)}</td><td>{c}</td><td>{100 * c / n:.1f}%</td></tr>"
                  for d, c in counts["decisions"].items())
    rows = []
    for r, e in counts["reasons"].items():
        ex = ", ".join(esc(sid) + ("" if sc is None else f" ({sc:.3g})") for sid, sc in e["examples"])
        rows.append(f"<tr><td>{esc(r)}</td><td>{esc(e['decision'])}</td><td>{e['n']}</td><td>{ex}</td></tr>")
    cfg = ", ".join(f"{esc(k)}={esc(v)}" for k, v in (config or {}).items()) or "(none)"
    return (f"<h3>{esc(step)}: {counts['inputs']} samples in</h3><p>config: {cfg}</p>"
            f"<table><tr><th>decision</th><th>samples</th><th>share</th></tr>{dec}</table>"
            "<h4>reasons</h4><table><tr><th>reason</th><th>decision</th><th>samples</th><th>examples (score)</th></tr>"
            + ("".join(rows) or '<tr><td colspan="4">none</td></tr>') + "</table>")
