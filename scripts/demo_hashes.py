"""sha256 of the demo's ledgers and exports: the behaviour contract a refactor must keep byte-identical.

    python scripts/demo_hashes.py demo_out > before.txt     # after `make demo`
    ... change the code, `make demo` again ...
    python scripts/demo_hashes.py demo_out --against before.txt

Hashed: the curate run's merged ledger and per-step counts, its export (shards, manifest, export ledger),
and each ablation variant's export ledger/shards when the ablation kept them. Decks (HTML with timings and
plot ids), the export's dataset card (it records the code version, which a refactor changes by design) and
evaluation scores of the CPU-trained tiny models are not part of the contract.
Exit status 1 when --against finds a contract file whose hash changed or that is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

CONTRACT = (
    "run/ledger.parquet",
    "run/counts.parquet",
    "run/summary.json",
    "run/export/manifest.json",
    "run/export/shards/**/*.tar",  # shards/<kind>/*.tar since the export's kind folders (format 2)
    "run/export/ledger/**/*.parquet",
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def contract_hashes(out: Path) -> dict[str, str]:
    """{relative path: sha256} of every contract file present under the demo output folder."""
    found: dict[str, str] = {}
    for pattern in CONTRACT:
        for p in sorted(out.glob(pattern)):
            if p.is_file():
                found[str(p.relative_to(out))] = sha256(p)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the demo's output folder (DEMO_OUT, default demo_out)")
    ap.add_argument("--against", type=Path, help="an earlier output of this script to compare with")
    a = ap.parse_args(argv)
    now = contract_hashes(a.out)
    if not now:
        print(f"no demo outputs under {a.out}; run `make demo` first", file=sys.stderr)
        return 2
    for rel, digest in now.items():
        print(f"{digest}  {rel}")
    if a.against is None:
        return 0
    before = {}
    for line in a.against.read_text().splitlines():
        if line.strip():
            digest, rel = line.split(None, 1)
            before[rel.strip()] = digest
    changed = [r for r in before if now.get(r) != before[r]]
    added = [r for r in now if r not in before]
    for r in changed:
        print(f"CHANGED  {r}  {before[r][:12]} -> {now.get(r, 'missing')[:12]}", file=sys.stderr)
    for r in added:
        print(f"NEW      {r}", file=sys.stderr)
    print(f"{len(before) - len(changed)}/{len(before)} contract files byte-identical", file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
