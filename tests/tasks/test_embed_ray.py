"""Embedding on a real local Ray cluster: >= 2 actors, an actor killed mid-run, resume byte-identical."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from core.foundation.configs import override
from core.foundation.ledger import check_balance
from core.steps.embed import EmbedIncomplete, embed_shards, tiny_embed_config
from tests.embed_data import mixed_samples, write_test_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.shutdown()  # a Flyte Ray task run earlier in the session leaves its local ray.init() running
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_kill_actor_mid_run_then_resume_is_byte_identical(ray_cluster, tmp_path):
    ray = ray_cluster
    cfg = tiny_embed_config(cache_dir=str(tmp_path / "cache"), batch_size=8, max_shard_retries=0)
    samples = mixed_samples(48, seed=3, size=160)
    urls = write_test_shards(str(tmp_path / "shards"), samples, per_shard=6)  # 8 shards

    ref = tmp_path / "ref"
    embed_shards(urls, str(ref / "embed"), cfg, use_ray=False)  # uninterrupted reference, in-process

    run = tmp_path / "run"
    out: dict[str, object] = {}

    def go() -> None:
        try:
            out["summary"] = embed_shards(urls, str(run / "embed"), cfg, actor_prefix="killtest")
        except Exception as e:  # handed to the test thread
            out["error"] = e

    th = threading.Thread(target=go)
    th.start()
    deadline = time.time() + 240
    victim = None
    while victim is None and time.time() < deadline:  # take the handle before the work starts
        try:
            victim = ray.get_actor("killtest-1")
        except ValueError:
            time.sleep(0.05)
    while not list((run / "ledger" / "embed").glob("part-*.parquet")) and time.time() < deadline and th.is_alive():
        time.sleep(0.01)
    ray.kill(victim, no_restart=True)  # mid-run: the first shard is out, most are still queued or running
    th.join(timeout=240)
    assert not th.is_alive()
    err = out.get("error")
    assert isinstance(err, EmbedIncomplete), out
    assert err.summary.n_actors == 2
    first = _files(run)
    done = {p for p in first if p.startswith("ledger")}
    # the killed actor's in-flight shard failed; the surviving actor went on with the queue
    assert err.failed and all(r.startswith("actor died") for r in err.failed.values()), err.failed
    assert 0 < len(done) == len(urls) - len(err.failed)
    # every published shard has both files (never half a shard)
    assert {p.split("part-")[1] for p in done} == {p.split("/")[-1] for p in first if p.startswith("embed")}

    summary = embed_shards(urls, str(run / "embed"), override(cfg, max_shard_retries=1), actor_prefix="killtest")
    assert len(summary.skipped) == len(done) and len(summary.shards) == len(urls) - len(done)
    assert summary.n_actors == min(2, len(urls) - len(done))
    assert _files(run) == _files(ref)  # byte-identical to the uninterrupted run
    check_balance(run, ["embed"], inputs=[s.id for s in samples])  # no duplicates, nothing missing


def test_flyte_task_runs_locally_on_ray_with_prev_ledger(ray_cluster, tmp_path):
    """The Flyte task body on an already-initialised local Ray (as flytekit's Ray plugin leaves it)."""
    from flytekit.types.directory import FlyteDirectory

    from core.foundation.ledger import LedgerWriter, read_ledger
    from tasks.embed import embed_shards as embed_task
    from tasks.types import StepOut

    run = tmp_path / "run"
    samples = mixed_samples(20, seed=4, size=96)
    urls = write_test_shards(str(run / "shards"), samples, per_shard=7)
    dropped = samples[3].id
    with LedgerWriter(run / "ledger" / "ingest" / "part-ingest.parquet", "ingest") as led:
        for i, s in enumerate(samples):
            shard = f"shard-{i // 7:06d}"
            led.add(s.id, "quarantine", "role_broken", shard=shard) if s.id == dropped else led.add(s.id, "keep", shard=shard)

    cfg = tiny_embed_config(cache_dir=str(tmp_path / "cache"), num_actors=2, batch_size=8)
    out = embed_task(shards=FlyteDirectory(str(run)), prev=StepOut("ingest", FlyteDirectory(str(run))), config=cfg)
    assert out.step == "embed"
    out_dir = Path(out.dir.path)
    assert len(list((out_dir / "embed").glob("*.parquet"))) == len(urls)
    ledger = read_ledger(out_dir / "ledger" / "embed")
    assert sorted(ledger.sample_id) == sorted(s.id for s in samples if s.id != dropped)
    check_balance([run, out_dir], ["ingest", "embed"])


def test_text_embedder_as_actor_matches_in_process(ray_cluster, tmp_path):
    import numpy as np

    from core.steps.embed.model import SigLIP2TextEmbedder, as_ray_actor

    cfg = tiny_embed_config(cache_dir=str(tmp_path / "cache"))
    texts = ["How many bars are in the chart?", "Read the total of the receipt."]
    actor = as_ray_actor(SigLIP2TextEmbedder, cfg)
    remote = ray_cluster.get(actor.embed_texts.remote(texts))
    ray_cluster.kill(actor)
    np.testing.assert_allclose(remote, SigLIP2TextEmbedder(cfg).embed_texts(texts), rtol=1e-5, atol=1e-6)
