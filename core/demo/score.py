"""Score a curation run of the demo dataset against the generator's ground truth.

Dedup: a planted duplicate group counts as found when all but one of its members were dropped by
semdedup; precision = share of semdedup drops that belong to a planted group (and are not its last
survivor). Quality filter: recall of planted garbled/unrelated/verbose samples among perplexity drops.
Quarantine: planted corrupt samples must be quarantined at ingest with exactly the planted reason.
Decontamination: planted copies of eval items (`eval_contamination` in the ground truth) must be dropped
with `eval_contamination:<their benchmark>`; precision = share of decontam drops that were planted.

    python -m core.demo.score --ground-truth demo_out/data/ground_truth.json --ledger demo_out/run/ledger.parquet
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def score_run(ground_truth: dict[str, Any], ledger) -> dict[str, Any]:
    """Precision/recall of each step's decisions against the planted defects (ledger: merged DataFrame)."""
    out: dict[str, Any] = {}
    dec = {(r.step, r.sample_id): (r.decision, r.reason) for r in ledger.itertuples()}
    steps = set(ledger["step"])

    corrupt = ground_truth.get("corrupt", {})
    hits = sum(1 for sid, kind in corrupt.items() if dec.get(("ingest", sid)) == ("quarantine", kind))
    out["quarantine"] = {"planted": len(corrupt), "quarantined_with_planted_reason": hits}

    if "semdedup" in steps:
        dropped = set(ledger[(ledger.step == "semdedup") & (ledger.decision == "drop")].sample_id)
        judged = set(ledger[ledger.step == "semdedup"].sample_id)
        groups = [g for g in ground_truth["near_duplicate_groups"] + ground_truth["exact_duplicate_groups"]
                  if all(s in judged for s in g)]
        found = [g for g in groups if sum(s in dropped for s in g) >= len(g) - 1]
        extra = [s for g in groups for s in g]
        true_drops = sum(min(sum(s in dropped for s in g), len(g) - 1) for g in groups)
        out["semdedup"] = {
            "planted_groups": len(groups),
            "groups_found": len(found),
            "recall": round(len(found) / max(len(groups), 1), 3),
            "dropped": len(dropped),
            "precision": round(true_drops / max(len(dropped), 1), 3),
            "dropped_outside_planted": len(dropped - set(extra)),
        }
    if "decontam" in steps:
        planted = {s: b for s, b in ground_truth.get("eval_contamination", {}).items()
                   if ("decontam", s) in dec}
        drops = ledger[(ledger.step == "decontam") & (ledger.decision == "drop")]
        hit = sum(1 for s, b in planted.items() if dec[("decontam", s)] == ("drop", f"eval_contamination:{b}"))
        out["decontam"] = {"planted": len(planted), "dropped_with_right_benchmark": hit,
                           "recall": round(hit / max(len(planted), 1), 3), "dropped": len(drops),
                           "precision": round(sum(s in planted for s in drops.sample_id) / max(len(drops), 1), 3)}
    if "ppl_filter" in steps:
        dropped = set(ledger[(ledger.step == "ppl_filter") & (ledger.decision == "drop")].sample_id)
        judged = set(ledger[ledger.step == "ppl_filter"].sample_id)
        res = {"dropped": len(dropped)}
        low_q = set()
        for kind in ("garbled", "unrelated", "verbose"):
            planted = [s for s in ground_truth.get(kind, []) if s in judged]
            low_q |= set(planted)
            res[f"{kind}_recall"] = round(sum(s in dropped for s in planted) / max(len(planted), 1), 3)
        res["precision_low_quality"] = round(len(dropped & low_q) / max(len(dropped), 1), 3)
        out["ppl_filter"] = res
    return out


def main() -> None:
    import pandas as pd

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ground-truth", required=True)
    p.add_argument("--ledger", required=True, help="merged ledger.parquet of a run (summarize_run output)")
    a = p.parse_args()
    gt = json.load(open(a.ground_truth))
    res = score_run(gt, pd.read_parquet(a.ledger))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
