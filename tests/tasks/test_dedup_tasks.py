"""Dedup tasks and the scale-out workflow, executed locally by flytekit (CPU)."""

import io
import json
import os
import re

import pytest
from flytekit.types.directory import FlyteDirectory
from PIL import Image

from core.demo.embeddings import clustered_embeddings, plant_duplicates, write_embedding_parquet
from core.foundation.ledger import LedgerWriter, check_balance, read_ledger, step_dir
from core.foundation.sample import Sample, Turn
from core.foundation.step import Passing
from core.io.wds import write_shards
from core.steps.dedup.config import DecontamConfig, SemDedupConfig
from tasks.types import StepOut


@pytest.fixture(autouse=True)
def _isolated_flyte_state(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYTE_INTERNAL_EXECUTION_ID", "")
    os.makedirs(tmp_path / "home", exist_ok=True)


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (v % 256, (3 * v) % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def world(tmp_path):
    x = clustered_embeddings(300, 16, 4, seed=2, spread=0.8)
    x, ids, planted = plant_duplicates(x, 10, 10, noise=0.03, seed=3)
    samples = [
        Sample(id=i, conversations=[Turn("human", "<image>\nWhat is shown?"), Turn("gpt", f"answer {i}")],
               images=[f"{i}.png"], image_bytes=[_png(k)])
        for k, i in enumerate(ids)
    ]
    run = tmp_path / "ingest"
    infos = write_shards(samples, str(run / "shards"), max_samples=200)
    shard_of = {sid: info.name for info in infos for sid in info.ids}
    with LedgerWriter(step_dir(run, "ingest") / "part-0.parquet", "ingest") as led:
        for i in ids:
            led.add(i, "keep", shard=shard_of[i])
    emb = tmp_path / "embed"
    emb.mkdir()
    for name in sorted(set(shard_of.values())):
        rows = [k for k, i in enumerate(ids) if shard_of[i] == name]
        write_embedding_parquet(str(emb / f"{name}.parquet"), [ids[k] for k in rows], x[rows], x[rows])
    return emb, run, ids, planted


def _out(d, step):
    return StepOut(step, FlyteDirectory(str(d)))


def test_semdedup_wf_map_task_matches_single_task(world):
    from tasks.dedup import dedup_embeddings
    from workflows.dedup import semdedup

    emb, run, ids, planted = world
    cfg = SemDedupConfig(n_clusters=4, target_removal=0.1, kmeans_iters=5, chunk_size=32, cluster_groups=3,
                         max_parallel_groups=2, device="cpu", sweep_subsample=150)
    out = semdedup(embeddings=_out(emb, "embed"), config=cfg, prev=_out(run, "ingest"), run=_out(run, "ingest"),
                   gpu=False)
    assert out.step == "semdedup"
    out_dir = out.dir.download()
    summary = json.loads(open(os.path.join(out_dir, "semdedup", "summary.json")).read())
    assert summary["n_removed"] == round(0.1 * len(ids)) and summary["n_deduped"] == len(ids)
    bal = check_balance([str(run), out_dir], ["ingest", "semdedup"])
    assert bal[1].dropped == summary["n_removed"]
    single = dedup_embeddings(embeddings=_out(emb, "embed"), config=cfg, prev=_out(run, "ingest"),
                              run=_out(run, "ingest"))
    a = read_ledger(step_dir(out_dir, "semdedup")).sort_values("sample_id")
    b = read_ledger(step_dir(single.dir.download(), "semdedup")).sort_values("sample_id")
    assert a.decision.tolist() == b.decision.tolist()


def test_report_gallery_shows_images_and_text(world):
    from core.steps.dedup.pipeline import run_semdedup
    from core.steps.dedup.report import semdedup_report_html, shard_fetcher

    emb, run, ids, _ = world
    out = run.parent / "dd"
    cfg = SemDedupConfig(n_clusters=4, eps=0.01, kmeans_iters=5, device="cpu", sweep_subsample=0)
    summary = run_semdedup(emb, out, cfg, Passing.read(run, "ingest"))
    led = read_ledger(step_dir(out, "semdedup"))
    html = semdedup_report_html(summary, shard_fetcher(str(run / "shards"), dict(zip(led.sample_id, led.shard))))
    pair = summary["most_similar_pairs"][0]
    assert pair["sample_id"] in html and pair["neighbour_id"] in html
    assert f"answer {pair['neighbour_id']}" in html and "data:image/jpeg;base64" in html
    assert "not found in shards" not in html


def test_decontam_task(world, tmp_path):
    from tasks.dedup import decontam

    emb, run, ids, _ = world
    from core.steps.dedup.embeddings import load_embeddings

    tid, tx = load_embeddings(emb, "image")
    ev = tmp_path / "ev"
    (ev / "embed").mkdir(parents=True)  # an embed output of ingest_eval_sets shards: files named <benchmark>-NNNNNN
    write_embedding_parquet(str(ev / "embed" / "countbench-000000.parquet"), ["q0", "q1"], tx[[5, 7]] * 2.0, tx[[5, 7]])
    out = decontam(embeddings=_out(emb, "embed"), evals=_out(ev, "embed"),
                   config=DecontamConfig(threshold=0.999, k=3), prev=_out(run, "ingest"))
    d = out.dir.download()
    led = read_ledger(step_dir(d, "decontam"))
    drops = led[led.decision == "drop"]
    assert set(drops.sample_id) >= {tid[5], tid[7]}
    assert set(drops.reason) == {"eval_contamination:countbench"}
    assert len(led) == len(ids)
    assert os.path.exists(os.path.join(d, "mining", "countbench.parquet"))


def test_prune_map_task_serializes_its_concurrency_cap(tmp_path):
    """The pairwise fan-out is built at run time (a @dynamic): compile it as propeller would and check the
    ArrayNode carries `max_parallel_groups` as its parallelism (the static package cannot show it)."""
    from flytekit.configuration import Image, ImageConfig, SerializationSettings
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.models.dynamic_job import DynamicJobSpec
    from flytekit.types.file import FlyteFile

    from core.steps.dedup.config import tiny_dedup_config
    from workflows.dedup import prune_groups

    imgs = [Image(name=n, fqn=f"ghcr.io/mmcurate/{n}", tag="t") for n in ("cpu", "gpu", "vllm", "train")]
    settings = SerializationSettings(image_config=ImageConfig(default_image=imgs[0], images=imgs),
                                     project="p", domain="d", version="v")
    groups = []
    for i in range(5):
        (tmp_path / f"g{i}.npz").write_bytes(b"x")
        groups.append(FlyteFile(str(tmp_path / f"g{i}.npz")))
    for cap, gpu in ((1, True), (3, False)):
        cfg = tiny_dedup_config()
        cfg.max_parallel_groups = cap
        ctx = FlyteContextManager.current_context().with_serialization_settings(settings)
        prune_groups._wf = None  # flytekit caches the compiled sub-workflow per process (a pod compiles once)
        with FlyteContextManager.with_context(ctx) as c:
            # every input, defaults included, as propeller passes them (an omitted one would stay a Promise)
            spec = prune_groups.compile_into_workflow(c, prune_groups._task_function, groups=groups, config=cfg,
                                                      gpu=gpu)
        assert isinstance(spec, DynamicJobSpec)
        arrays = [n.array_node.to_flyte_idl() for n in spec.nodes if n.array_node is not None]
        assert len(arrays) == 1 and arrays[0].parallelism == cap
        worker = arrays[0].node.task_node.reference_id.name
        assert re.search(r"\.map_prune_cluster_group_[0-9a-f]+-arraynode$", worker), worker  # one task, no twin
        gpus = {r.name: r.value for r in arrays[0].node.task_node.overrides.resources.requests}
        assert gpus[2] == ("1" if gpu else "0"), gpus  # the profile rides on the node (2 = GPU)
