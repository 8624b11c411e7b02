"""Activate the scheduled launch plans of a registered version (`make activate`); registration leaves them off.

Finds every LaunchPlan with a schedule under the workflows package, refuses any whose default inputs still hold
a placeholder URL (workflows.evaluate.PLACEHOLDER_URL: set MMCURATE_NIGHTLY_PREFIX / MMCURATE_NIGHTLY_CACHE when
registering), then runs `pyflyte launchplan --activate NAME VERSION` for each. --dry-run prints the commands.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys

from flytekit import LaunchPlan


def scheduled_plans(package: str = "workflows") -> dict[str, LaunchPlan]:
    pkg = importlib.import_module(package)
    plans = {}
    for m in [pkg] + [importlib.import_module(i.name) for i in pkgutil.walk_packages(pkg.__path__, package + ".")]:
        for obj in vars(m).values():
            if isinstance(obj, LaunchPlan) and obj.schedule is not None:
                plans[obj.name] = obj
    return plans


def placeholders(plan: LaunchPlan, marker: str) -> list[str]:
    """Inputs of `plan` whose default or fixed value is a placeholder URL."""
    values = {**(plan.saved_inputs or {})}
    return sorted(k for k, v in values.items() if isinstance(v, str) and v.startswith(marker))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--version", required=True)
    ap.add_argument("--project", default="flytesnacks")
    ap.add_argument("--domain", default="development")
    ap.add_argument("--config", default="flyte.config")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    from workflows.evaluate import PLACEHOLDER_URL

    plans = scheduled_plans()
    bad = {name: placeholders(p, PLACEHOLDER_URL) for name, p in plans.items()}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        for name, inputs in bad.items():
            print(f"make activate: {name} still has placeholder paths in {inputs} ({PLACEHOLDER_URL}...); set "
                  "MMCURATE_NIGHTLY_PREFIX and MMCURATE_NIGHTLY_CACHE, `make register`, then `make activate`",
                  file=sys.stderr)
        return 2
    for name in sorted(plans):
        cmd = [sys.executable, "-m", "flytekit.clis.sdk_in_container.pyflyte", "--config", args.config,
               "launchplan", "--project", args.project, "--domain", args.domain, "--activate", name, args.version]
        print(" ".join(cmd[2:]) if args.dry_run else f"activating {name} {args.version}")
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
