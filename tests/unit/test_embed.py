"""Embedding step: config, embedders, near-duplicates, shard pipeline, quarantine, resume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.foundation.configs import override
from core.foundation.ledger import check_balance, read_ledger
from core.foundation.step import Passing
from core.steps.embed import EmbedConfig, embed_shards, load_embeddings, siglip2_embed_config, tiny_embed_config
from core.steps.embed.model import SigLIP2ImageEmbedder, SigLIP2TextEmbedder, tiny_checkpoint
from tests.embed_data import (
    bomb_png,
    corrupt_jpeg,
    encode,
    mixed_samples,
    near_duplicates,
    sample,
    scene,
    truncate_tar,
    write_test_shards,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("embed-cache"))


@pytest.fixture(scope="session")
def cfg(cache_dir) -> EmbedConfig:
    return tiny_embed_config(cache_dir=cache_dir, batch_size=8)


def _bad_samples() -> list:
    return [sample("bad_corrupt", [corrupt_jpeg(1)]), sample("bad_bomb", [bomb_png()]),
            sample("bad_second_image", [encode(scene(3, 64)), corrupt_jpeg(2)]),
            sample("bad_truncated_jpeg", [encode(scene(5, 256))[:1500]])]  # opens, fails in (draft) decode


# ---- config -------------------------------------------------------------------------------------
def test_config_validates_and_presets():
    with pytest.raises(ValueError, match="text_view"):
        tiny_embed_config(text_view="everything")
    with pytest.raises(ValueError, match="num_gpus"):
        tiny_embed_config(device="cuda")  # a CUDA actor must reserve a GPU
    with pytest.raises(ValueError, match="cpu"):
        tiny_embed_config(num_gpus=1.0)
    prod = siglip2_embed_config(cache_dir="/models/hf")
    assert prod.model_name == "hf-hub:timm/ViT-SO400M-14-SigLIP2-378"
    assert (prod.device, prod.precision, prod.num_gpus, prod.out_dtype) == ("cuda", "amp_bf16", 1.0, "float16")
    assert tiny_embed_config().num_gpus == 0 and tiny_embed_config().num_actors >= 2


# ---- embedders ----------------------------------------------------------------------------------
def test_tiny_training_is_reproducible(tmp_path):
    from safetensors.torch import load_file

    from core.steps.embed.tiny_train import train_tiny_vit

    small = dict(n_pairs=16, steps=3, batch_size=8, views=2)
    train_tiny_vit(tmp_path / "a.safetensors", seed=0, **small)
    train_tiny_vit(tmp_path / "b.safetensors", seed=0, **small)
    train_tiny_vit(tmp_path / "c.safetensors", seed=1, **small)
    a, b, c = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "abc")
    assert a.keys() == b.keys()
    assert all(torch_equal(a[k], b[k]) for k in a)
    assert not torch_equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_tiny_training_patch_dropout(tmp_path):
    """Patch dropout only changes training: it is in the cache key, changes the trained weights, and the saved
    state dict has exactly the untrained model's tensors (the embedder loads it into the plain architecture)."""
    from safetensors.torch import load_file

    from core.steps.embed.model import random_tiny_checkpoint
    from core.steps.embed.tiny_train import DEFAULT_PARAMS, tiny_vit_key, train_tiny_vit

    assert DEFAULT_PARAMS["patch_dropout"] > 0
    assert tiny_vit_key(0) != tiny_vit_key(0, patch_dropout=0.0)
    small = dict(n_pairs=16, steps=3, batch_size=8, views=2)
    train_tiny_vit(tmp_path / "pd.safetensors", seed=0, **small)
    train_tiny_vit(tmp_path / "no.safetensors", seed=0, patch_dropout=0.0, **small)
    pd, no = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("pd", "no"))
    ref = load_file(str(random_tiny_checkpoint(tmp_path, seed=0)))
    assert pd.keys() == no.keys() == ref.keys()
    assert all(pd[k].shape == ref[k].shape for k in ref)
    assert not torch_equal(pd["visual.conv1.weight"], no["visual.conv1.weight"])


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_tiny_checkpoint_is_trained_and_cached(tmp_path):
    """The embedded default loads trained weights (safetensors, trained once per machine and copied), which
    separate demo scenes: a re-encoded or cropped copy is nearer its original than any other scene is."""
    import io
    import json

    from PIL import Image

    from core.steps.embed.tiny_train import demo_pairs, shared_cache_dir

    p1 = tiny_checkpoint(tmp_path / "a", seed=0)
    p2 = tiny_checkpoint(tmp_path / "b", seed=0)
    assert p1.suffix == ".safetensors" and p1.read_bytes() == p2.read_bytes()
    meta = json.loads((shared_cache_dir() / "tiny_vit" / p1.name).with_suffix(".json").read_text())
    assert meta["losses"][-1] < 0.5 * meta["losses"][0]
    emb = SigLIP2ImageEmbedder(tiny_embed_config(cache_dir=str(tmp_path / "a")))
    scenes = [im for im, _ in demo_pairs(24, seed=99)]  # pairs of a seed the model never saw
    copies = []
    for i, im in enumerate(scenes):
        if i % 2:
            w, h = im.size
            copies.append(im.crop((w // 20, h // 20, w - w // 20, h - h // 20)))
        else:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=40)
            copies.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    a, b = emb.embed_images(scenes), emb.embed_images(copies)
    sim = a @ b.T
    own = np.diag(sim)
    other = (a @ a.T - 2 * np.eye(len(a))).max(axis=1)  # nearest other scene
    assert (own > other).mean() >= 0.9, (own, other)
    assert np.median(own) > 0.95 > np.median(other)


def test_embedders_unit_vectors_and_tokenizer(cfg):
    img = SigLIP2ImageEmbedder(cfg)
    txt = SigLIP2TextEmbedder(cfg)
    assert img.lm is txt.lm  # one model per process
    v = img.embed_images([scene(i, 96) for i in range(3)])
    assert v.shape == (3, 128) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    tok = txt.tokenize(["hello world", "word " * 500])
    assert tok.shape == (2, txt.lm.context_length) == (2, 64)  # long text truncated to the context length
    t = txt.embed_texts(["a chart of sales", "a chart of sales", "a cat on a sofa"])
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    assert np.allclose(t[0], t[1]) and not np.allclose(t[0], t[2])


def test_near_duplicates_are_nearer_than_unrelated(cfg):
    """Random-weight tiny ViT: re-encoded/resized/cropped copies retrieve their original, and are
    much closer to it than unrelated images (the shuffled-pair baseline)."""
    n = 16
    emb = SigLIP2ImageEmbedder(cfg)
    origs = [scene(100 + i) for i in range(n)]
    e = emb.embed_images(origs)
    variants = [emb.embed_images(near_duplicates(o)) for o in origs]
    v = np.concatenate(variants)
    src = np.repeat(np.arange(n), len(variants[0]))
    sims = v @ e.T
    top1 = (sims.argmax(1) == src).mean()
    dup_sim = sims[np.arange(len(src)), src]
    shuffled = sims[np.arange(len(src)), (src + 1 + np.arange(len(src)) % (n - 1)) % n]  # never the source
    assert top1 >= 0.9, top1
    assert np.median(dup_sim) > np.quantile(shuffled, 0.9), (np.median(dup_sim), np.quantile(shuffled, 0.9))
    # random features are anisotropic (unrelated cosine ~0.9), so compare cosine distances: a copy is
    # far nearer to its original than unrelated images are to each other
    assert (1 - shuffled).mean() > 20 * (1 - dup_sim).mean(), ((1 - shuffled).mean(), (1 - dup_sim).mean())


def test_jpeg_draft_decode_covers_model_input():
    from core.steps.embed.worker import decode_for_model

    big = encode(scene(7, 800).resize((800, 600)))
    im = decode_for_model(big, 64)
    assert im.mode == "RGB" and min(im.size) >= 64 and im.size[0] < 800  # reduced, never below the input
    assert decode_for_model(big, 0).size == (800, 600)  # draft off: full decode


def _preprocess_images() -> list:
    """Sizes/modes around the model sides: tiny, thin, odd, already at the input size, large."""
    from PIL import Image

    sizes = [(1, 1), (5, 300), (300, 5), (63, 64), (64, 64), (65, 64), (96, 96), (97, 130), (224, 224), (225, 400),
             (378, 378), (379, 200), (500, 333), (640, 480), (1000, 99), (2048, 31)]
    ims = [scene(i, max(w, h, 64)).resize((w, h)) for i, (w, h) in enumerate(sizes)]
    ims += [scene(40, 90).convert("L"), scene(41, 120).convert("RGBA"), scene(42, 70).convert("P")]
    ims += [Image.open(__import__("io").BytesIO(encode(scene(43 + k, 384)))) for k in range(2)]  # JPEG files
    return ims


@pytest.mark.parametrize("kind", ["tiny", "vit-b-16", "squash-378", "longest-256", "bilinear-100"])
def test_batch_preprocess_pixels_equal_the_model_preprocess(cfg, kind):
    """The per-image PIL stage + per-batch tensor stage gives exactly the open_clip Compose's pixels."""
    import open_clip
    import torch

    from core.io.images import decode_image
    from core.steps.embed.preprocess import BatchPreprocess

    pp = {"tiny": lambda: SigLIP2ImageEmbedder(cfg).lm.preprocess,
          "vit-b-16": lambda: open_clip.image_transform(224, is_train=False),
          "squash-378": lambda: open_clip.image_transform(378, is_train=False, resize_mode="squash",
                                                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
          "longest-256": lambda: open_clip.image_transform(256, is_train=False, resize_mode="longest"),
          "bilinear-100": lambda: open_clip.image_transform(100, is_train=False, interpolation="bilinear")}[kind]()
    bp = BatchPreprocess.split(pp)
    assert bp is not None
    ims = _preprocess_images()
    # images as the worker gives them (RGB) and as they come (other modes fall back per image)
    for batch in ([decode_image(encode(im.convert("RGB"), "PNG")) for im in ims], ims,
                  [decode_image(encode(im.convert("RGB")), draft_side=64) for im in ims]):
        ref = torch.stack([pp(im.copy()) for im in batch])
        got = bp.batch([bp.image(im.copy()) for im in batch])
        assert got.dtype == ref.dtype and got.shape == ref.shape and got.stride() == ref.stride()
        assert torch.equal(got, ref)
    assert isinstance(bp.image(ims[0].convert("RGB")), np.ndarray)  # RGB images take the batched path


def test_batch_preprocess_declines_unknown_pipelines():
    from torchvision import transforms as T

    from core.steps.embed.preprocess import BatchPreprocess

    assert BatchPreprocess.split(T.Compose([T.Resize(32), T.ToTensor(), T.Lambda(lambda x: x * 2)])) is None
    assert BatchPreprocess.split(T.Compose([T.Resize(32), T.ToTensor(), T.Normalize((0,) * 3, (0,) * 3)])) is None
    assert BatchPreprocess.split(lambda im: im) is None
    assert BatchPreprocess.split(T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])) is not None


# ---- pipeline (in-process worker) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    samples = mixed_samples(21, seed=1) + _bad_samples()
    return samples, write_test_shards(str(d), samples, per_shard=8)


def test_embed_shards_layout_quarantine_resume(cfg, shards, tmp_path):
    samples, urls = shards
    out, led = str(tmp_path / "embed"), str(tmp_path / "ledger" / "embed")
    summary = embed_shards(urls, out, cfg, use_ray=False)
    assert summary.n_kept == 21 and summary.n_quarantined == 4

    ledger = read_ledger(led)
    q = ledger[ledger.decision == "quarantine"].set_index("sample_id")["reason"].to_dict()
    assert q == {"bad_corrupt": "corrupt_image", "bad_bomb": "decompression_bomb", "bad_second_image": "corrupt_image",
                 "bad_truncated_jpeg": "corrupt_image"}
    check_balance(tmp_path, ["embed"], inputs=[s.id for s in samples])

    ids, pooled = load_embeddings(out, "image")
    tids, text = load_embeddings(out, "text")
    eids, each = load_embeddings(out, "image_each")
    by_id = {s.id: s for s in samples}
    kept = [s.id for s in samples if not s.id.startswith("bad_")]
    assert tids == kept  # shard order, exactly the kept samples
    assert ids == [i for i in kept if by_id[i].images]  # text-only samples have no image vector
    assert len(eids) == sum(len(by_id[i].images) for i in kept)
    for m in (pooled, text, each):
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, rtol=1e-5)
    # pooled vector of a two-image sample = re-normalised mean of its per-image vectors
    two = next(i for i in kept if len(by_id[i].images) == 2)
    per = each[[k for k, e in enumerate(eids) if e == two]]
    m = per.mean(0)
    np.testing.assert_allclose(pooled[ids.index(two)], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
    # a single-image sample's pooled vector is its image vector
    one = next(i for i in kept if len(by_id[i].images) == 1)
    np.testing.assert_array_equal(pooled[ids.index(one)], each[eids.index(one)])

    # resume: nothing to do on a re-run; a lost shard is redone byte-identically
    before = {p: Path(p).read_bytes() for p in map(str, sorted(Path(tmp_path).rglob("*.parquet")))}
    again = embed_shards(urls, out, cfg, use_ray=False)
    assert len(again.skipped) == len(urls) and not again.shards
    os.remove(f"{led}/part-shard-000001.parquet")
    redo = embed_shards(urls, out, cfg, use_ray=False)
    assert [s["shard"] for s in redo.shards] == ["shard-000001"]
    after = {p: Path(p).read_bytes() for p in map(str, sorted(Path(tmp_path).rglob("*.parquet")))}
    assert before == after


def test_float16_output_and_text_view(cfg, shards, tmp_path):
    _, urls = shards
    c16 = override(cfg, out_dtype="float16", what="text", text_view="all")
    embed_shards(urls[:1], str(tmp_path / "embed"), c16, use_ray=False)
    t = pq.read_table(tmp_path / "embed" / "shard-000000.parquet")
    assert "image_emb" not in t.column_names and str(t.schema.field("text_emb").type.value_type) == "halffloat"
    ids, x = load_embeddings(tmp_path / "embed", "text")
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    # the "all" view embeds question+answer: differs from the first-human view of the same sample
    ref_ids, ref = load_embeddings(_first_view(cfg, urls[:1], tmp_path / "fv"), "text")
    assert ids == ref_ids and not np.allclose(x, ref, atol=1e-2)


def _first_view(cfg, urls, d) -> str:
    embed_shards(urls, str(d / "embed"), override(cfg, what="text"), use_ray=False)
    return str(d / "embed")


def test_prev_ids_by_shard_and_truncated_shard(cfg, tmp_path):
    samples = mixed_samples(10, seed=2)
    urls = write_test_shards(str(tmp_path / "shards"), samples, per_shard=10)
    truncate_tar(urls[0], keep_members=8)  # cut inside the 5th sample's members
    wanted = [s.id for s in samples if s.id != samples[1].id]  # samples[1] was dropped upstream
    embed_shards(urls, str(tmp_path / "embed"), cfg, prev=Passing("ingest", {"shard-000000": wanted}), use_ray=False)
    ledger = read_ledger(tmp_path / "ledger" / "embed")
    assert sorted(ledger.sample_id) == sorted(wanted)  # every input decided once, the dropped one absent
    reasons = ledger.set_index("sample_id")["reason"]
    assert (reasons[samples[-1].id]) == "missing_from_shard"
    ids, _ = load_embeddings(tmp_path / "embed", "text")
    assert set(ids) == set(ledger.loc[ledger.decision == "keep", "sample_id"]) and samples[1].id not in ids


def test_prev_ids_in_no_embedded_shard_are_quarantined_once(cfg, shards, tmp_path):
    """Ids the previous ledger places in a shard that is not embedded, and ids without a shard name that
    no shard holds, get one `missing_from_shard` row each (the base's part-zz-missing), never vanish."""
    samples, urls = shards
    first = [s.id for s in samples[:8]]  # shard-000000
    prev = Passing("ingest", {"shard-000000": first, "shard-000009": ["ghost"]})
    embed_shards(urls[:1], str(tmp_path / "a" / "embed"), cfg, prev=prev, use_ray=False)
    check_balance(tmp_path / "a", ["embed"], inputs=first + ["ghost"])
    led = read_ledger(tmp_path / "a" / "ledger" / "embed").set_index("sample_id")
    assert led.loc["ghost", "reason"] == "missing_from_shard" and (led.decision == "keep").sum() == 8
    assert (tmp_path / "a" / "ledger" / "embed" / "part-zz-missing.parquet").exists()

    loose = Passing.of([samples[0].id, samples[9].id, "ghost"])  # no shard names: every shard restricted to them
    embed_shards(urls[:2], str(tmp_path / "b" / "embed"), cfg, prev=loose, use_ray=False)
    check_balance(tmp_path / "b", ["embed"], inputs=[samples[0].id, samples[9].id, "ghost"])
    led = read_ledger(tmp_path / "b" / "ledger" / "embed").set_index("sample_id")
    assert led.decision.to_dict() == {samples[0].id: "keep", samples[9].id: "keep", "ghost": "quarantine"}


def test_demo_planted_near_duplicates_retrieve_their_original(cfg, tmp_path):
    """The demo's planted near-duplicate pairs (JPEG re-encode, resize, crop of one scene) after ingest:
    with the random-weight tiny model the copy is the original's nearest or second-nearest image."""
    from core.demo import generate_demo, load_ground_truth
    from core.io.ingest import IngestConfig, ingest
    from core.io.wds import list_shards

    generate_demo(str(tmp_path / "data"), n_samples=160, seed=1)
    ingest(IngestConfig(source=str(tmp_path / "data" / "data.jsonl"), image_root=str(tmp_path / "data" / "images"),
                        run_dir=str(tmp_path / "run"), shard_max_samples=80))
    embed_shards(list_shards(str(tmp_path / "run" / "shards")), str(tmp_path / "run" / "embed"),
                 override(cfg, what="image"), use_ray=False)
    ids, x = load_embeddings(tmp_path / "run" / "embed", "image")
    pos = {s: i for i, s in enumerate(ids)}
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    pairs = [(pos[a], pos[b]) for a, b in load_ground_truth(str(tmp_path / "data"))["near_duplicate_groups"]]
    assert len(pairs) >= 5
    ranks = [int((sims[i] > sims[i, j]).sum()) for i, j in pairs]  # images closer to i than its copy j
    assert np.mean([r == 0 for r in ranks]) >= 0.75 and max(ranks) <= 2, ranks


def test_shard_without_inputs_is_marked_done_with_empty_files(cfg, shards, tmp_path):
    _, urls = shards
    s = embed_shards(urls[:1], str(tmp_path / "embed"), cfg, prev=Passing("ingest", {}), use_ray=False)  # no inputs
    assert s.n_kept == 0 and s.n_quarantined == 0
    t = pq.read_table(tmp_path / "embed" / "shard-000000.parquet")
    assert t.num_rows == 0 and t.schema.field("text_emb").type.list_size == 128
    assert len(read_ledger(tmp_path / "ledger" / "embed")) == 0
    assert embed_shards(urls[:1], str(tmp_path / "embed"), cfg, prev=Passing("ingest", {}), use_ray=False).skipped


def test_next_shard_prefetch_is_byte_identical_and_dropped_when_not_asked_for(cfg, shards, tmp_path):
    """embed_shards(use_ray=False) reads and decodes the next shard while one finishes: same bytes as
    embedding each shard on its own; a prefetched shard that is not asked for next is dropped."""
    from core.steps.embed.worker import ShardEmbedWorker

    _, urls = shards
    w = ShardEmbedWorker(cfg)
    alone = [w.embed_shard(u) for u in urls]
    chained = [w.embed_shard(u, prefetch=(urls[i + 1], None) if i + 1 < len(urls) else None)
               for i, u in enumerate(urls)]
    assert [(r.embeddings, r.ledger) for r in chained] == [(r.embeddings, r.ledger) for r in alone]
    # prefetch one shard, then ask for another (and for the first with other ids): prefetch dropped
    w.embed_shard(urls[0], prefetch=(urls[1], None))
    assert w.embed_shard(urls[2]).embeddings == alone[2].embeddings
    ids = ["s1_0000", "s1_0001"]
    w.embed_shard(urls[1], prefetch=(urls[0], None))
    assert w.embed_shard(urls[0], include_ids=ids).embeddings == w.embed_shard(urls[0], include_ids=ids).embeddings
    # an unreadable prefetched shard: dropped when not asked for, the same outcome as unprefetched when it is
    missing = str(tmp_path / "missing.tar")
    w.embed_shard(urls[0], prefetch=(missing, None))
    assert w.embed_shard(urls[1]).ledger == alone[1].ledger
    w.embed_shard(urls[0], prefetch=(missing, None))
    got = w.embed_shard(missing)
    assert got.stats["reasons"] == {"truncated_tar": 1} and got.ledger == w.embed_shard(missing).ledger
