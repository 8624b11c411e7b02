"""The eval workflows run locally end to end, and `pyflyte package` serializes the concurrency cap."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile

import pandas as pd
import pytest

from core.demo.eval_fixtures import write_fixtures
from core.evals import register_backend, unregister_backend
from tests.evals_doubles import OracleBackend, oracle_table

BENCHES = ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf_cache")
    write_fixtures(str(root))
    return str(root)


@pytest.fixture
def oracle(cache):
    table = oracle_table(cache, BENCHES)

    def factory(ckpt_dir, device):
        if os.path.exists(os.path.join(ckpt_dir, "BROKEN")):
            raise RuntimeError("planted load failure")
        return OracleBackend(table, ckpt_dir)

    register_backend("oracle", factory)
    try:
        yield
    finally:
        unregister_backend("oracle")


def _ckpts(root, epochs, broken=()):
    out = []
    for e in epochs:
        d = root / f"epoch_{e}"
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(b"w" * 64)
        if e in broken:
            (d / "BROKEN").write_text("")
        out.append(str(d))
    return out


def test_evaluation_workflow_local(cache, oracle, tmp_path):
    from workflows.evaluate import evaluation

    ckpts = _ckpts(tmp_path / "ckpts", [1, 2, 3], broken=(2,))
    out = evaluation(checkpoints=ckpts, benchmarks=["docvqa", "realworldqa", "chartqa"], cache_dir=cache,
                     backend="oracle", device="cpu", batch_size=2, group_size=2)  # fmt: skip
    d = out.download() if hasattr(out, "download") else out.path
    table = pd.read_csv(os.path.join(d, "results.csv")).set_index("checkpoint_name")
    assert table.loc["epoch_1", "status"] == "ok" and table.loc["epoch_3", "docvqa"] == 1.0
    assert table.loc["epoch_2", "status"] == "failed" and "planted load failure" in table.loc["epoch_2", "error"]
    recs = pd.read_parquet(os.path.join(d, "records.parquet"))
    # 2 good checkpoints x (3 docvqa + 4 realworldqa + 4 chartqa), split over 2 groups per checkpoint
    assert len(recs) == 2 * 11 and recs["correct"].all()
    assert "Score vs epoch" in open(os.path.join(d, "report.html")).read()


def test_prefix_evaluation_lists_checkpoints(cache, oracle, tmp_path):
    from workflows.evaluate import prefix_evaluation

    _ckpts(tmp_path / "run", [2, 1])
    out = prefix_evaluation(prefix=str(tmp_path / "run"), benchmarks=["countbench"], cache_dir=cache,
                            pattern="epoch_*", backend="oracle", device="cpu")  # fmt: skip
    d = out.download() if hasattr(out, "download") else out.path
    table = pd.read_csv(os.path.join(d, "results.csv"))
    assert list(table["checkpoint_name"]) == ["epoch_1", "epoch_2"]
    assert list(table["countbench"]) == [0.8, 0.8]  # the planted corrupt image counts as wrong


def test_plan_rejects_unknown_benchmark():
    from tasks.evals import plan_eval_jobs

    with pytest.raises(Exception, match="unknown benchmarks"):
        plan_eval_jobs(checkpoints=["a"], benchmarks=["docvqa", "mmmu"], group_size=0)


def test_package_serializes_concurrency_cap(tmp_path):
    from flyteidl.admin import launch_plan_pb2, workflow_pb2
    from google.protobuf.json_format import MessageToDict

    from workflows.evaluate import EVAL_CONCURRENCY

    state = tmp_path / "home"
    state.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT, "HOME": str(state), "TMPDIR": str(tmp_path)}
    pyflyte = os.path.join(os.path.dirname(sys.executable), "pyflyte")
    images = [a for n in ("cpu", "gpu", "vllm", "train") for a in ("--image", f"{n}=ghcr.io/mmcurate/{n}:test")]
    tgz = tmp_path / "pkg.tgz"
    subprocess.run([pyflyte, "--pkgs", "workflows", "package", "--source", ROOT, *images, "-f", "-o", str(tgz)],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=240)  # fmt: skip
    with tarfile.open(tgz) as t:
        t.extractall(tmp_path / "x", filter="data")
    # package files are <n>_<name>_<resource type>.pb; 2 = workflow, 3 = launch plan
    (wf_file,) = glob.glob(str(tmp_path / "x" / "*workflows.evaluate.evaluation_2.pb"))
    spec = workflow_pb2.WorkflowSpec()
    spec.ParseFromString(open(wf_file, "rb").read())
    nodes = MessageToDict(spec)["template"]["nodes"]
    # the fan-out is the dynamic `evaluate_jobs` (it gives the workers the run's profile); the cap is compiled
    # into the spec it returns, checked here as propeller would build it (tests/tasks/test_profiles.py: profiles)
    assert not [n for n in nodes if "arrayNode" in n]
    assert any(n.get("taskNode", {}).get("referenceId", {}).get("name") == "workflows.evaluate.evaluate_jobs"
               for n in nodes)
    from tests.tasks.test_profiles import _eval_spec, caps

    assert caps(_eval_spec("auto", True)) == {"evaluate_checkpoint_benchmarks": [EVAL_CONCURRENCY]}
    assert EVAL_CONCURRENCY == 2
    (lp_file,) = glob.glob(str(tmp_path / "x" / "*nightly_eval_3.pb"))
    lp = launch_plan_pb2.LaunchPlan()
    lp.ParseFromString(open(lp_file, "rb").read())
    lpd = MessageToDict(lp)
    assert lpd["spec"]["entityMetadata"]["schedule"]["cronSchedule"]["schedule"] == "0 3 * * *"
    assert lpd["spec"]["workflowId"]["name"] == "workflows.evaluate.prefix_evaluation"


def test_collect_marks_lost_workers(cache, oracle, tmp_path):
    from flytekit.types.directory import FlyteDirectory

    from core.evals import evaluate_checkpoint, tiny_eval_config
    from tasks.evals import collect_eval_results

    (ck,) = _ckpts(tmp_path / "ckpts", [1])
    cfg = tiny_eval_config(cache)
    cfg.backend, cfg.benchmarks = "oracle", ["docvqa"]
    wdir = evaluate_checkpoint(ck, cfg, str(tmp_path / "w"))
    lost = str(tmp_path / "ckpts" / "epoch_2")
    out = collect_eval_results(results=[FlyteDirectory(wdir), None], checkpoints=[ck, lost],
                               groups=["docvqa", "docvqa,chartqa"])  # fmt: skip
    table = pd.read_csv(os.path.join(out.path, "results.csv")).set_index("checkpoint_name")
    assert table.loc["epoch_1", "status"] == "ok" and table.loc["epoch_1", "docvqa"] == 1.0
    assert table.loc["epoch_2", "status"] == "failed" and table.loc["epoch_2", "error"] == "worker_lost"
