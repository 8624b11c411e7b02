"""docs/scale.md's 12M plan states the requests the package makes: every row of its plan table is checked against
the compiled production `curate_steps` (mammoth_v1 + decontam + rephrase on the qwen preset)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.package_checks import _nodes

ROOT = Path(__file__).resolve().parents[2]
TASK_OF = {  # plan row -> the task node whose requests it states
    "ingest": "tasks.ingest.ingest_dataset",
    "decontam": "tasks.dedup.decontam",
    "semdedup": "tasks.dedup.cluster_embeddings",
    "perplexity": "tasks.perplexity.score_perplexity",
    "ppl_filter": "tasks.perplexity.slice_by_perplexity",
    "rephrase": "tasks.rephrase.rephrase_samples",
    "export": "tasks.export.export_dataset",
    "summary": "tasks.run_report.summarize_run",
}


def _plan() -> dict[str, dict[str, str]]:
    text = (ROOT / "docs" / "scale.md").read_text()
    table = text.split("<!-- plan-table -->", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    return {r["step"]: r for r in (dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:])}


def _requests(text: str) -> dict[int, str]:
    """`66 CPU · 8 GPU · 256Gi` -> {1: '66', 2: '8', 3: '256Gi'} (flyteidl resource names: CPU 1, GPU 2, MEMORY 3)."""
    out = {2: "0"}
    for part in text.replace("workers ", "").split("·"):
        part = part.strip()
        if m := re.fullmatch(r"(\d+(?:\.\d+)?) (CPU|GPU)", part):
            out[1 if m.group(2) == "CPU" else 2] = m.group(1)
        elif re.fullmatch(r"\d+Gi", part):
            out[3] = part
    return out


def test_the_12m_plan_states_the_packages_requests():
    from google.protobuf.json_format import MessageToDict

    from core.foundation.configs import override
    from core.runs.steps import STEP_NAMES
    from tests.tasks.test_packaging import compile_dynamic
    from workflows.curate import curate_steps, mammoth_v1_curation

    plan = _plan()
    assert [s for s in plan if s != "summary"] == [s for s in STEP_NAMES if s != "image_filter"]  # table order
    cfg = override(mammoth_v1_curation.saved_inputs["config"], decontam=True, rephrase=True, rephrase_config="qwen")
    spec = compile_dynamic(curate_steps, config=cfg, source="s.json", image_root="img", eval_cache="ec")
    tasks = {t.id.name: t for t in spec.tasks}
    nodes = {}
    for n in _nodes(spec.nodes):
        if n.WhichOneof("target") == "task_node":
            nodes.setdefault(n.task_node.reference_id.name, n)
    for step, task in TASK_OF.items():
        n = nodes[task]
        got = {r.name: r.value for r in n.task_node.overrides.resources.requests}
        if not got:  # no profile override: the decorator's requests
            got = {r.name: r.value for r in tasks[task].container.resources.requests}
        got.setdefault(2, "0")
        head = plan[step]["requests per task"].split(";")[0].replace("head ", "")
        assert got == _requests(head), (step, got, plan[step])
    # steps whose fan-out runs on KubeRay worker pods: the row's pods x actors and each pod's requests
    for step, task in TASK_OF.items():
        groups = MessageToDict(tasks[task].custom).get("rayCluster", {}).get("workerGroupSpec", []) \
            if tasks[task].type == "ray" else []
        row = plan[step]
        if not groups:
            assert ";" not in row["requests per task"], (step, "the row states worker pods the task does not have")
            continue
        (group,) = groups
        m = re.search(r"(\d+) pods × (\d+) actors", row["tasks × workers"])
        assert m, (step, row)
        fan = getattr(cfg, f"{step}_config").fanout
        assert int(group["replicas"]) == int(m.group(1)) == fan.pods and fan.pod_workers == int(m.group(2)), (step, group)
        res = group["k8sPod"]["podSpec"]["containers"][0]["resources"]["requests"]
        got = {1: res["cpu"], 2: res.get("nvidia.com/gpu", "0"), 3: res["memory"]}
        assert got == _requests(row["requests per task"].split(";")[1].replace("workers ", "")), (step, got, row)
    # embed: the Ray job's worker group is the row's workers, each with its GPU
    embed = MessageToDict(tasks["tasks.embed.embed_shards"].custom)
    group = embed["rayCluster"]["workerGroupSpec"][0]
    workers = int(re.search(r"× (\d+) workers", plan["embed"]["tasks × workers"]).group(1))
    assert group["replicas"] == workers == cfg.embed_config.num_actors
    assert "1 GPU" in plan["embed"]["requests per task"] and cfg.embed_config.num_gpus == 1
    # semdedup's pairwise map: the concurrency the row states
    from flytekit.types.file import FlyteFile

    from workflows.steps import prune_groups

    cap = int(re.search(r"concurrency (\d+)", plan["semdedup"]["tasks × workers"]).group(1))
    inner = compile_dynamic(prune_groups, groups=[FlyteFile(str(ROOT / "README.md"))], config=cfg.semdedup_config,
                            gpu=True)  # the map is built inside prune_groups' own dynamic
    assert [n.array_node.parallelism for n in inner.nodes if n.WhichOneof("target") == "array_node"] == [cap]
    groups = int(re.search(r"map of (\d+) groups", plan["semdedup"]["tasks × workers"]).group(1))
    assert cfg.semdedup_config.cluster_groups == groups
