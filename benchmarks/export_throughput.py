"""Export throughput (MB/s) vs plain `tar cf` of the same files, measured in the same run.

Builds a run (ingested shards + two ledgers dropping ~10%), exports it with `export_curated`, extracts
the exported samples' files to disk and tars them with `tar cf`. Both are timed warm (page cache), best
of `--repeats`. Last line: `ratio: X` = export MB/s / tar MB/s (goal >= 0.5).

    PYTHONPATH=. .venv/bin/python benchmarks/export_throughput.py [--samples 3000] [--px 320]
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core.foundation.ledger import LedgerWriter, step_dir
from core.foundation.sample import Sample
from core.io.wds import list_shards, write_shards
from core.steps.export import ExportConfig, export_curated


def _image(rng: np.random.Generator, px: int) -> bytes:
    # smooth gradients + noise: JPEG sizes like photos (tens of KB), not like pure noise
    y, x = np.mgrid[0:px, 0:px]
    base = np.stack([(x * rng.uniform(0.2, 1)) % 255, (y * rng.uniform(0.2, 1)) % 255, (x + y) % 255], -1)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_run(root: Path, n: int, px: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pool = [_image(rng, px) for _ in range(64)]
    samples = []
    for i in range(n):
        k = 2 if i % 10 == 0 else 1
        rec = {"id": f"b{i:07d}", "image": [f"{i}_{j}.jpg" for j in range(k)] if k > 1 else f"{i}.jpg",
               "conversations": [{"from": "human", "value": "<image>\n" * k + "What is shown in the picture?"},
                                 {"from": "gpt", "value": "A chart with several bars and a title. " * 4}]}
        s = Sample.from_record(rec)
        s.image_bytes = [pool[(i * 7 + j) % len(pool)] for j in range(k)]
        samples.append(s)
    run = root / "run"
    write_shards(samples, str(run / "shards"), max_samples=500)
    with LedgerWriter(step_dir(run, "ingest") / "part-0.parquet", "ingest") as led:
        for s in samples:
            led.add(s.id, "keep")
    with LedgerWriter(step_dir(run, "semdedup") / "part-0.parquet", "semdedup") as led:
        for i, s in enumerate(samples):
            led.add(s.id, "drop", "semdedup_eps") if i % 10 == 3 else led.add(s.id, "keep")
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--px", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("tar") is None:
        raise SystemExit("tar not found")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        run = build_run(root, args.samples, args.px)
        shards = list_shards(str(run / "shards"))
        t_exp, mb = [], 0.0
        for r in range(args.repeats):
            out = root / f"export{r}"
            t0 = time.perf_counter()
            m = export_curated(shards, str(run), str(out), ExportConfig())
            t_exp.append(time.perf_counter() - t0)
            mb = m["n_bytes"] / 1e6
        # baseline: the same exported members as plain files, tarred by GNU tar
        files = root / "files"
        files.mkdir()
        for p in sorted((root / "export0" / "shards").glob("*.tar")):
            with tarfile.open(p) as tf:
                tf.extractall(files, filter="data")
        t_tar, tar_mb = [], 0.0
        for r in range(args.repeats):
            dst = root / f"plain{r}.tar"
            t0 = time.perf_counter()
            subprocess.run(["tar", "cf", str(dst), "-C", str(files), "."], check=True)
            t_tar.append(time.perf_counter() - t0)
            tar_mb = dst.stat().st_size / 1e6
        exp_mbs = mb / min(t_exp)
        tar_mbs = tar_mb / min(t_tar)
        print(f"samples exported: {m['n_samples']} of {args.samples}, {m['n_shards']} shards, {mb:.1f} MB")
        print(f"export: best {min(t_exp):.3f} s -> {exp_mbs:.1f} MB/s (runs: {', '.join(f'{t:.3f}' for t in t_exp)})")
        print(f"tar cf: best {min(t_tar):.3f} s -> {tar_mbs:.1f} MB/s (runs: {', '.join(f'{t:.3f}' for t in t_tar)})")
        print(f"ratio: {exp_mbs / tar_mbs:.2f}")


if __name__ == "__main__":
    main()
