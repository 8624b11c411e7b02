"""WDS reader/writer throughput (MB/s) vs GNU tar on the same shards, measured in the same run.

Read: `iter_samples` over the shards (images loaded, not decoded) vs `tar xOf shard > /dev/null`.
Write: `write_shards` of the read samples vs `tar cf` of the same members extracted to files.
Warm page cache, best of `--repeats`. Last line: `ratio: X` = tar time / core.io.wds time for one read
plus one write pass of the same bytes (i.e. MB/s of core.io.wds over MB/s of tar).

    PYTHONPATH=. .venv/bin/python benchmarks/wds_io.py [--samples 3000] [--px 320]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.export_throughput import build_run
from core.io.wds import iter_samples, list_shards, write_shards


def best(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--px", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("tar") is None:
        raise SystemExit("tar not found")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        shards = list_shards(str(build_run(root, args.samples, args.px) / "shards"))
        mb = sum(Path(s).stat().st_size for s in shards) / 1e6
        samples = list(iter_samples(shards, verify_images=False))
        t_read = best(lambda: sum(1 for _ in iter_samples(shards, verify_images=False)), args.repeats)

        def tar_read() -> None:
            for s in shards:
                subprocess.run(["tar", "xOf", s], check=True, stdout=subprocess.DEVNULL)

        t_tar_read = best(tar_read, args.repeats)
        out = root / "w"
        t_write = best(lambda: (shutil.rmtree(out, ignore_errors=True), write_shards(samples, str(out))), args.repeats)
        files = root / "files"
        files.mkdir()
        for s in shards:
            with tarfile.open(s) as tf:
                tf.extractall(files, filter="data")
        t_tar_write = best(lambda: subprocess.run(["tar", "cf", str(root / "plain.tar"), "-C", str(files), "."],
                                                  check=True), args.repeats)
        print(f"{len(samples)} samples, {len(shards)} shards, {mb:.1f} MB")
        print(f"read : core.io.wds {mb / t_read:.1f} MB/s, tar xOf {mb / t_tar_read:.1f} MB/s")
        print(f"write: core.io.wds {mb / t_write:.1f} MB/s, tar cf {mb / t_tar_write:.1f} MB/s")
        print(f"ratio: {(t_tar_read + t_tar_write) / (t_read + t_write):.2f}")


if __name__ == "__main__":
    main()
