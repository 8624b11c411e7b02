"""What each hostile ingest input gets now: reason, seconds and memory growth (the table of docs/security.md).

    python benchmarks/hostile_inputs.py            # every case of tests/hostile_inputs.py

Each case (two good records around one hostile record) is ingested in a child capped at 4 GB of address
space (tests/capped.py); the table prints the hostile record's quarantine reason, the wall seconds of the
whole ingest (count pass + read + shards + ledger), the child's peak RSS and its growth over the start.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.capped import run_capped  # noqa: E402
from tests.hostile_inputs import CASES, run_case  # noqa: E402


def main() -> None:
    import pandas  # noqa: F401  (read_ledger)
    import pyarrow.parquet  # noqa: F401

    import core.io.ingest  # noqa: F401  imported before the children fork: growth is the work, not imports

    print("| input | reason | kept others | seconds | peak RSS MB | grown MB |")
    print("|---|---|---|---|---|---|")
    for name, build in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            case = build(Path(d))
            res = run_capped(run_case, case, Path(d) / "run", mem_mb=4096, timeout_s=300)
            reasons = sorted({res.value["reasons"].get(k, "KEPT") for k in case.expected})
            kept = res.value["kept"] == sorted(case.good)
            print(f"| {name} | {', '.join(reasons)} | {'yes' if kept else 'NO'} | {res.seconds:.2f} | "
                  f"{res.peak_rss_mb:.0f} | {res.grown_mb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
