"""SemDeDup on the demo dataset: planted exact and near duplicates against the generator's ground truth.

The embedding here is a 16x16 RGB thumbnail of the first image, centered on the dataset mean (the demo's
near copies are each other's nearest image at that size); the model embeddings come from the embed step.
"""

import io

import numpy as np
import pytest
from PIL import Image

from core.demo import generate_demo, load_ground_truth, load_records
from core.demo.embeddings import write_embedding_parquet
from core.foundation.ledger import read_ledger, step_dir
from core.steps.dedup.config import SemDedupConfig
from core.steps.dedup.pipeline import run_semdedup


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    info = generate_demo(str(out), n_samples=300, seed=0, corrupt=False)
    gt = load_ground_truth(str(out))
    ids, vecs, text_only = [], [], []
    for r in load_records(str(out)):
        img = r.get("image")
        if not img:
            text_only.append(r["id"])
            continue
        name = img if isinstance(img, str) else img[0]
        with open(f"{info.images_dir}/{name}", "rb") as f:
            im = Image.open(io.BytesIO(f.read())).convert("RGB").resize((16, 16), Image.BILINEAR)
        ids.append(r["id"])
        vecs.append(np.asarray(im, np.float32).ravel() / 255.0)
    x = np.stack(vecs)
    x -= x.mean(axis=0)
    emb = out / "embed"
    emb.mkdir()
    write_embedding_parquet(str(emb / "shard-000000.parquet"), ids, x, None)
    pairs = [tuple(g) for g in gt["near_duplicate_groups"] + gt["exact_duplicate_groups"]]
    return emb, ids, pairs, out


def _score(removed: set[str], pairs):
    """(precision: removed ids that belong to a planted pair, recall: pairs with a member removed,
    pairs that lost both members: with crude thumbnail embeddings two different planted pairs can
    look alike, so a member can also be the copy of a look-alike from another pair)."""
    members = {i for p in pairs for i in p}
    found = sum(1 for p in pairs if set(p) & removed)
    both = sum(1 for p in pairs if set(p) <= removed)
    return len(removed & members) / max(len(removed), 1), found / len(pairs), both


def test_demo_planted_duplicates_target_mode(demo, tmp_path):
    emb, ids, pairs, _ = demo
    target = len(pairs) / len(ids)
    cfg = SemDedupConfig(n_clusters=6, target_removal=target, kmeans_iters=20, device="cpu", sweep_subsample=0)
    s = run_semdedup(emb, tmp_path / "run", cfg)
    led = read_ledger(step_dir(tmp_path / "run", "semdedup"))
    removed = set(led[led.decision == "drop"].sample_id)
    precision, recall, both = _score(removed, pairs)
    print(f"demo target mode: removed {len(removed)} (target {round(target * len(ids))}), "
          f"precision={precision:.3f} recall={recall:.3f} pairs losing both={both} eps={s['eps']:.4f}")
    assert len(removed) == round(target * len(ids))
    assert precision >= 0.9 and recall >= 0.9 and both <= 2


def test_demo_planted_duplicates_eps_mode(demo, tmp_path):
    emb, ids, pairs, _ = demo
    cfg = SemDedupConfig(n_clusters=6, eps=0.01, kmeans_iters=20, device="cpu", sweep_subsample=0)
    run_semdedup(emb, tmp_path / "run", cfg)
    led = read_ledger(step_dir(tmp_path / "run", "semdedup"))
    removed = set(led[led.decision == "drop"].sample_id)
    precision, recall, both = _score(removed, pairs)
    print(f"demo eps=0.01: removed {len(removed)}, precision={precision:.3f} recall={recall:.3f} both={both}")
    assert precision >= 0.9 and recall >= 0.9 and both <= 2
