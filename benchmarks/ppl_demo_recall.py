"""Recall of the demo's planted low-quality samples (garbled, unrelated) in the worst perplexity decile.

    PYTHONPATH=. .venv/bin/python benchmarks/ppl_demo_recall.py [--n 300] [--steps 300]

The tiny LM is trained on the clean samples of a demo generated with another seed (held out: the scored
samples were never seen in training), then the seed-0 demo is ingested and scored in `assistant_only`
and `text` modes. Baseline in the same run: the recall a random ranking gets in expectation (the decile
fraction). Also reported: the in-sample variant (LM trained on the scored demo's own clean samples).
Rankings: raw perplexity and the shrunk value slice_by_perplexity uses by default (shrink_tokens=10).
Last line: `recall@worst_decile: X (random: 0.10)`: held-out LM, assistant_only, shrunk ranking.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from core.foundation.sample import Sample
from core.io.ingest import IngestConfig, ingest
from core.io.wds import list_shards
from core.models.tiny_lm import ensure_tiny_lm
from core.steps.perplexity import read_scores, score_shards, tiny_perplexity_config
from core.steps.perplexity.reference import reference_texts
from core.steps.perplexity.slices import ranking_values


def clean_samples(demo_dir: str) -> list[Sample]:
    gt = json.loads((Path(demo_dir) / "ground_truth.json").read_text())
    clean = set(gt["clean"])
    recs = [json.loads(line) for line in (Path(demo_dir) / "data.jsonl").read_text().splitlines() if line.strip()]
    return [Sample.from_record(r) for r in recs if r["id"] in clean]


def recall(scores, planted: set[str], shrink: float = 10.0, frac: float = 0.1) -> tuple[float, int, int]:
    """Recall of `planted` among the worst `frac` of samples ranked like slice_by_perplexity does."""
    ok = scores[scores.n_scored > 0].copy()
    ok["rank_value"] = ranking_values(ok.nll.to_numpy(), ok.n_scored.to_numpy(dtype=float), shrink)
    ok = ok.sort_values(["rank_value", "sample_id"], ascending=[False, True])
    k = max(1, round(frac * len(ok)))
    worst = set(ok.sample_id.head(k))
    present = planted & set(ok.sample_id)
    return (len(worst & present) / len(present) if present else float("nan")), len(worst & present), len(present)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workdir", default="")
    a = ap.parse_args(argv)
    from core.demo import generate_demo  # the demo generator (core/demo/dataset.py, from main)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="ppl_demo_"))
    demo, ref = work / "demo", work / "ref"
    generate_demo(str(demo), n_samples=a.n, seed=0)
    generate_demo(str(ref), n_samples=a.n, seed=1)
    gt = json.loads((demo / "ground_truth.json").read_text())
    planted = {"garbled": set(gt["garbled"]), "unrelated": set(gt["unrelated"]), "verbose": set(gt["verbose"])}
    low_quality = planted["garbled"] | planted["unrelated"]
    ingest(IngestConfig(source=str(demo / "data.jsonl"), image_root=str(demo / "images"), run_dir=str(work / "run")))
    shards = list_shards(str(work / "run" / "shards"))

    lms = {
        "held_out": ensure_tiny_lm(work / "lm_held_out", reference_texts(clean_samples(str(ref))), steps=a.steps),
        "in_sample": ensure_tiny_lm(work / "lm_in_sample", reference_texts(clean_samples(str(demo))), steps=a.steps),
    }
    headline = None
    for lm_name, lm in lms.items():
        for mode in ("assistant_only", "text"):
            out = work / f"scores_{lm_name}_{mode}"
            score_shards(shards, out, tiny_perplexity_config(lm, mode=mode))
            sc = read_scores(out)
            n_ok = int((sc.n_scored > 0).sum())
            for shrink in (0.0, 10.0):
                r_all, hit, n = recall(sc, low_quality, shrink)
                parts = [f"{k}={recall(sc, v, shrink)[0]:.2f}" for k, v in planted.items()]
                print(f"lm={lm_name:9s} mode={mode:14s} rank={'raw ppl' if shrink == 0 else 'shrunk k=10'} "
                      f"scored={n_ok} worst_decile={max(1, round(0.1 * n_ok))} "
                      f"recall(garbled+unrelated)={r_all:.2f} ({hit}/{n}) per kind: {' '.join(parts)}")
                if lm_name == "held_out" and mode == "assistant_only" and shrink:
                    headline = r_all
    print(f"workdir: {work}")
    print(f"recall@worst_decile: {headline:.2f} (random: 0.10)")


if __name__ == "__main__":
    main()
