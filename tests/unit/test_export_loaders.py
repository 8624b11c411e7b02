"""Exported shards read by the loaders researchers use: the stock `webdataset` library (decode, to_tuple,
a torch DataLoader with 2 workers) and a plain `tarfile` loop. The demo dataset (jpg, png, webp and
multi-image samples) is ingested and exported as the pipeline does."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from core.demo import generate_demo
from core.io.ingest import IngestConfig, ingest
from core.io.wds import iter_samples, list_shards
from core.steps.export import ExportConfig, export_curated


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    generate_demo(str(root / "data"), n_samples=120, seed=0, corrupt=False)
    ingest(IngestConfig(source=str(root / "data/data.json"), image_root=str(root / "data/images"),
                        run_dir=str(root / "run"), shard_max_samples=40))  # fmt: skip
    return root


def _export(root: Path, name: str, image_format: str = "jpg") -> list[str]:
    out = root / name
    if not (out / "manifest.json").exists():
        export_curated(list_shards(str(root / "run/shards")), str(root / "run"), str(out),
                       ExportConfig(steps=["ingest"], max_samples=30, image_format=image_format))  # fmt: skip
    return list_shards(str(out / "shards"))


def _source_formats(root: Path) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for s in iter_samples(list_shards(str(root / "run/shards")), load_images=False):
        for n in s.images:
            counts[n.rsplit(".", 1)[-1]] += 1
    return counts


def _resize(im):  # module level: DataLoader workers pickle the pipeline
    import torch

    return torch.from_numpy(np.asarray(im.convert("RGB").resize((16, 16)))).permute(2, 0, 1)


def _sample_id(rec):
    return rec["id"]


def _has_jpg(sample):
    return "jpg" in sample


def test_demo_source_has_mixed_formats(demo_run):
    fmts = _source_formats(demo_run)
    assert fmts["png"] > 0 and fmts["webp"] > 0 and fmts["jpg"] > 0, fmts  # the case the issue hit


def test_webdataset_to_tuple_reads_every_single_image_sample(demo_run):
    import webdataset as wds

    urls = _export(demo_run, "jpg")
    singles = [s for s in iter_samples(urls, load_images=False) if len(s.images) == 1]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").select(_has_jpg).to_tuple("jpg", "json")
    got = list(ds)
    assert len(got) == len(singles) > 50
    for im, rec in got:
        assert im.size[0] > 0 and rec["image"].endswith(".jpg")


def test_json_image_names_are_the_member_names(demo_run):
    """Every name in `image` is a member of the sample (webdataset key = name after the sample key), and
    multi-image samples use indexed keys."""
    import webdataset as wds

    urls = _export(demo_run, "jpg")
    n_multi = n_text = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        rec = sample["json"]
        names = rec.get("image") or []
        names = [names] if isinstance(names, str) else names
        n_multi += len(names) > 1
        n_text += not names
        for i, name in enumerate(names):
            key, _, suffix = name.partition(".")
            assert key == sample["__key__"]
            assert suffix == (f"{i}.jpg" if len(names) > 1 else "jpg")
            assert sample[suffix].size[0] > 0
        assert {k for k in sample if not k.startswith("__")} == {"json", *(n.partition(".")[2] for n in names)}
    assert n_multi > 0 and n_text > 0


def test_dataloader_with_two_workers_yields_a_batch(demo_run):
    import torch
    import webdataset as wds

    urls = _export(demo_run, "jpg")
    assert len(urls) >= 2  # one shard per worker at least
    ds = (wds.WebDataset(urls, shardshuffle=False).decode("pil").select(_has_jpg).to_tuple("jpg", "json")
          .map_tuple(_resize, _sample_id))  # fmt: skip
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    images, ids = next(iter(loader))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8
    assert len(ids) == 8 and all(isinstance(i, str) for i in ids)
    n = sum(len(b[1]) for b in loader)
    assert n == sum(1 for s in iter_samples(urls, load_images=False) if len(s.images) == 1)


def test_plain_tarfile_loop(demo_run):
    from PIL import Image

    urls = _export(demo_run, "jpg")
    n = 0
    for url in urls:
        members: dict[str, bytes] = {}
        with tarfile.open(url) as tf:
            for ti in tf:
                members[ti.name] = tf.extractfile(ti).read()
        for name in (m for m in members if m.endswith(".json")):
            rec = json.loads(members[name])
            images = rec.get("image") or []
            for img_name in [images] if isinstance(images, str) else images:
                with Image.open(io.BytesIO(members[img_name])) as im:
                    assert im.format == "JPEG"
            n += 1
    assert n == 120


@pytest.mark.parametrize("fmt,key,pil_format", [("png", "png", "PNG"), ("keep", None, None)])
def test_other_image_formats(demo_run, fmt, key, pil_format):
    import webdataset as wds

    from core.io.images import sniff_format

    urls = _export(demo_run, fmt, image_format=fmt)
    exts = defaultdict(int)
    for sample in wds.WebDataset(urls, shardshuffle=False):  # undecoded: the member bytes
        names = json.loads(sample["json"]).get("image") or []
        for name in [names] if isinstance(names, str) else names:
            suffix = name.partition(".")[2]
            exts[suffix.rsplit(".", 1)[-1]] += 1
            if pil_format:
                assert sniff_format(sample[suffix]) == pil_format
    if key:
        assert set(exts) == {key}
    else:
        assert exts == _source_formats(demo_run)  # keep: each image in its source format


def test_reencoded_export_is_byte_identical(demo_run, tmp_path):
    a = _export(demo_run, "jpg")
    other = tmp_path / "again"
    export_curated(list_shards(str(demo_run / "run/shards")), str(demo_run / "run"), str(other),
                   ExportConfig(steps=["ingest"], max_samples=30, image_format="jpg"))  # fmt: skip
    b = list_shards(str(other / "shards"))
    assert [Path(u).read_bytes() for u in a] == [Path(u).read_bytes() for u in b]


def test_jpeg_sources_are_copied_byte_for_byte(demo_run):
    src = {s.id: s for s in iter_samples(list_shards(str(demo_run / "run/shards")))}
    for s in iter_samples(_export(demo_run, "jpg")):
        for old, new in zip(src[s.id].image_bytes, s.image_bytes, strict=True):
            if old[:3] == b"\xff\xd8\xff":
                assert new == old
            else:
                assert new[:3] == b"\xff\xd8\xff"


def test_bad_image_format_is_rejected():
    with pytest.raises(ValueError, match="image_format"):
        ExportConfig(image_format="webp")


def _card_configs(card: str) -> dict[str, str]:
    """{config_name: data_files path} from the dataset card's YAML header (the Hub's `configs:` form)."""
    head = card.split("---", 2)[1]
    names = [json.loads(line.split(":", 1)[1]) for line in head.splitlines() if line.startswith("- config_name:")]
    paths = [json.loads(line.split(":", 1)[1]) for line in head.splitlines() if line.strip().startswith("path:")]
    return dict(zip(names, paths, strict=True))


def test_huggingface_datasets_loads_every_kind(demo_run, tmp_path):
    """`datasets.load_dataset("webdataset", data_files=...)` (what the Hub's viewer and `datasets` users run)
    loads each kind folder of a demo export with the card's own data_files, and the counts equal the manifest."""
    import datasets  # a pinned dev dependency (pyproject `dev`): a missing install fails, never skips
    _export(demo_run, "hf")
    out = demo_run / "hf"
    manifest = json.loads((out / "manifest.json").read_text())
    configs = _card_configs((out / "README.md").read_text())
    assert sorted(configs) == sorted(manifest["kinds"]) and {"image", "text"} <= set(configs)
    assert any(k.startswith("images") for k in configs)  # the demo has multi-image samples
    total = 0
    for kind, pattern in configs.items():
        ds = datasets.load_dataset("webdataset", data_files={"train": str(out / pattern)}, split="train",
                                   cache_dir=str(tmp_path / "hf"))
        assert len(ds) == manifest["kinds"][kind]["n_samples"]
        row = ds[0]
        n_img = 0 if kind == "text" else 1 if kind == "image" else int(kind[len("images"):].split("-")[0])
        assert len(row["json"]["conversations"]) >= 2
        images = [row[k] for k in row if k.endswith("jpg")]
        assert len(images) == n_img and all(im.size[0] > 0 for im in images)  # decoded PIL images
        total += len(ds)
    assert total == manifest["n_samples"]


def test_card_counts_match_manifest(demo_run):
    """The card's per-kind and per-step numbers are the manifest's."""
    _export(demo_run, "card")
    out = demo_run / "card"
    manifest = json.loads((out / "manifest.json").read_text())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: unknown\n")
    for kind, k in manifest["kinds"].items():
        assert f"| `{kind}` |" in card and f"| {k['n_samples']} | {k['n_shards']} |" in card
    for r in manifest["removed_by_step"]:
        assert f"| `{r['step']}` | {r['inputs']} | {r['kept']} | {r['modified']} | {r['removed']} |" in card
    assert f"{manifest['n_samples']} samples in {manifest['n_shards']} WebDataset shards" in card
