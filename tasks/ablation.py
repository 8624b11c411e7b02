"""Ablation-grid tasks: choose a variant's samples from the ledgers, collect checkpoints, compare variants."""

from __future__ import annotations

import json
import logging
import os
from typing import List, NamedTuple, Optional

from flytekit import Deck, Resources, current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import CPU_IMAGE
from tasks.paths import source, workdir
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut

log = logging.getLogger(__name__)


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="4Gi"), cache=True,
      cache_version=task_version(__name__))
def select_variant(steps: List[StepOut], variant: str) -> FlyteFile:
    """Write the sample ids of one variant (baseline, semdedup@0.1, ppl@0-90, ppl_decile@3, ...).

    :param steps: Outputs of ingest, embed and the steps the variant reads (semdedup, perplexity, ...).
    :param variant: Variant spec; see core/runs/ablation.py for the grammar.
    :return: JSON list of sample ids.
    """
    from core.runs.ablation import parse_variant
    from core.runs.ablation import select_variant as select

    ids = select(parse_variant(variant), [s.dir.download() for s in steps])
    path = os.path.join(current_context().working_directory, f"{parse_variant(variant).name}.json")
    with open(path, "w") as f:
        json.dump(ids, f)
    log.info("variant %s: %d samples", variant, len(ids))
    return FlyteFile(path)


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="2Gi"), cache=True,
      cache_version=task_version(__name__))
def build_tiny_vision_tower(seed: int = 0) -> FlyteDirectory:
    """The embedded tiny open_clip model as a `local-dir` (the frozen vision tower of the built-in trainer).

    :param seed: Weight seed (the same seed as the tiny embedder, so trainer and embedder share the model).
    """
    from core.steps.embed.model import tiny_local_dir

    return FlyteDirectory(tiny_local_dir(os.path.join(current_context().working_directory, "tiny_vit"), seed))


class CheckpointLists(NamedTuple):
    flat: List[str]
    per_variant: List[List[str]]
    per_seed: List[List[str]]


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def checkpoint_uris(per_variant: List[List[FlyteDirectory]],
                    seeds: Optional[List[List[FlyteDirectory]]] = None) -> CheckpointLists:
    """Checkpoint directories -> URIs (remote location on a cluster, local path in local runs).

    :param per_variant: Each variant's checkpoints, in epoch order.
    :param seeds: The extra baseline seeds' checkpoints (the noise floor), in seed order.
    :return: `flat` (every checkpoint, variants then seeds: what the evaluation runs on), `per_variant`, `per_seed`.
    """
    lists = [[source(c) for c in cks] for cks in per_variant]
    seed_lists = [[source(c) for c in cks] for cks in seeds or []]
    return CheckpointLists(flat=[u for cks in lists + seed_lists for u in cks], per_variant=lists,
                           per_seed=seed_lists)


@task(container_image=CPU_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, requests=Resources(cpu="1", mem="4Gi"))
def compare_variants(
    variants: List[str],
    checkpoints: List[List[str]],
    exports: List[StepOut],
    evaluation: FlyteDirectory,
    tokenizer: Optional[FlyteDirectory] = None,
    output_dir: str = "",
    steps: Optional[List[StepOut]] = None,
    known_bad_ids: Optional[FlyteFile] = None,
    seed_checkpoints: Optional[List[List[str]]] = None,
    train_metrics: Optional[List[FlyteFile]] = None,
    seed_train_metrics: Optional[List[FlyteFile]] = None,
) -> FlyteDirectory:
    """One comparison table: variant x benchmark (final checkpoint), deltas vs baseline, sample and token counts.

    :param variants: Variant specs in grid order.
    :param checkpoints: Per variant, its checkpoint URIs in epoch order (the last one is compared).
    :param exports: Per variant, its export step's output (manifest.json + shards).
    :param evaluation: Output of the evaluation workflow (summary.parquet).
    :param tokenizer: Training tokenizer (HF dir) for token counts; characters/4 when absent.
    :param output_dir: Optional path/URL to publish the comparison and the evaluation results to.
    :param known_bad_ids: Optional id list (JSON or one per line) of known low-quality samples: per variant, how
        many of them its export kept (`known_bad_kept`) and removed vs the baseline (`known_bad_removed`).
    :param steps: Outputs of the shared steps (ingest, embed, semdedup, ...), for their decks.
    :param seed_checkpoints: The baseline retrained with other seeds (`baseline-seed1`, ...): the noise floor.
    :param train_metrics: Per variant, its training metrics.jsonl (held-out loss); `seed_train_metrics` per seed.
    :return: Directory with comparison.parquet, comparison.csv, paired.parquet, paired.csv (per variant x
        benchmark x metric: paired delta to the baseline, 95% interval, significant, noise floor, verdict),
        scores_by_epoch.parquet and decks/ (each step's deck page: shared steps, export_<variant>,
        train_<variant>, train_baseline-seed<k>, evaluation, ablation).

    Ends by printing where the comparison, the evaluation results and each deck page are.
    """
    if not variants or len(checkpoints) != len(variants) or len(exports) != len(variants):
        raise ValueError(f"one checkpoint list and one export per variant: {len(variants)} variants, "
                         f"{len(checkpoints)} checkpoint lists, {len(exports)} exports")
    t0 = step_started("ablation", variants=len(variants))
    from core.foundation.report import DECKS_DIR, paths_block
    from core.io.publish import display_root, publish
    from core.runs.ablation_compare import collect_ablation_decks, comparison_html, format_paired, seed_run_name
    from core.runs.ablation_compare import compare_variants as compare
    from core.runs.summary import load_id_list

    bad = load_id_list(known_bad_ids.download()) if known_bad_ids is not None else None
    eval_dir = evaluation.download()
    out = str(workdir("ablation"))
    seed_checkpoints = seed_checkpoints or []
    cmp = compare(variants, checkpoints, [ex.dir.download() for ex in exports], eval_dir, out,
                  tokenizer.download() if tokenizer is not None else None, bad, seed_checkpoints=seed_checkpoints,
                  train_metrics=[m.download() for m in train_metrics] if train_metrics else None,
                  seed_train_metrics=[m.download() for m in seed_train_metrics] if seed_train_metrics else None)
    Deck("ablation", comparison_html(cmp))
    seed_names = [seed_run_name(k + 1) for k in range(len(seed_checkpoints))]
    decks = collect_ablation_decks(out, variants + seed_names, checkpoints + seed_checkpoints,
                                   [source(s.dir) for s in steps or []], [source(ex.dir) for ex in exports],
                                   eval_dir) + ["ablation"]
    save_decks(out, "ablation")
    if output_dir:
        publish(out, output_dir, {"evaluation": eval_dir})
    step_finished("ablation", t0, variants=len(variants))
    where = display_root(output_dir) if output_dir else out
    rows = [("comparison", f"{where}/comparison.csv"),
            ("evaluation", f"{where}/evaluation" if output_dir else eval_dir)]
    rows += [(f"deck {name}", f"{where}/{DECKS_DIR}/{name}.html") for name in decks]
    print(f"paired comparison with the baseline (noise: spread of {1 + len(seed_checkpoints)} baseline seeds):\n"
          f"{format_paired(cmp.paired)}", flush=True)
    print(paths_block(f"ablation finished: {len(variants)} variants; outputs:", rows), flush=True)
    return FlyteDirectory(out)
