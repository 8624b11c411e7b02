"""Mirror of a run's checkpoints to durable storage (s3://, gs://, ...), for preemption across pods.

A pod-local output dir is lost when a pod is preempted; with `TrainConfig.mirror_uri` every checkpoint
is uploaded after it is written, and a relaunched run pulls the mirror before looking for checkpoints.
The state file is uploaded last, so a half-uploaded checkpoint has none and is ignored on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path

import fsspec

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


def pull(uri: str, output_dir: str | Path) -> int:
    """Download `uri/checkpoints/*` (complete ones) and `uri/metrics.jsonl` into output_dir; returns #checkpoints."""
    fs, root = fsspec.core.url_to_fs(uri)
    out = Path(output_dir)
    n = 0
    if fs.exists(f"{root}/metrics.jsonl"):
        out.mkdir(parents=True, exist_ok=True)
        fs.get(f"{root}/metrics.jsonl", str(out / "metrics.jsonl"))
    if not fs.exists(f"{root}/checkpoints"):
        return 0
    for d in sorted(fs.ls(f"{root}/checkpoints", detail=False)):
        name = d.rstrip("/").rsplit("/", 1)[-1]
        if not fs.exists(f"{d}/{STATE_FILE}") or (out / "checkpoints" / name / STATE_FILE).exists():
            continue
        dst = out / "checkpoints" / name
        dst.mkdir(parents=True, exist_ok=True)
        fs.get(f"{d}/", str(dst) + "/", recursive=True)
        n += 1
    log.info("pulled %d checkpoints from %s", n, uri)
    return n


def push(ckpt_dir: str | Path, output_dir: str | Path, uri: str) -> None:
    """Upload one checkpoint (state file last) and metrics.jsonl; drop mirrored checkpoints pruned locally."""
    fs, root = fsspec.core.url_to_fs(uri)
    ck = Path(ckpt_dir)
    dst = f"{root}/checkpoints/{ck.name}"
    for f in sorted(p for p in ck.rglob("*") if p.is_file() and p.name != STATE_FILE):
        fs.put_file(str(f), f"{dst}/{f.relative_to(ck).as_posix()}")
    fs.put_file(str(ck / STATE_FILE), f"{dst}/{STATE_FILE}")
    metrics = Path(output_dir) / "metrics.jsonl"
    if metrics.exists():
        fs.put_file(str(metrics), f"{root}/metrics.jsonl")
    local = {p.name for p in (Path(output_dir) / "checkpoints").iterdir()}
    for d in fs.ls(f"{root}/checkpoints", detail=False):
        if d.rstrip("/").rsplit("/", 1)[-1] not in local:
            fs.rm(d, recursive=True)
