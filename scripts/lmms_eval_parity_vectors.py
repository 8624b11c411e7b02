"""Write tests/data/lmms_eval_parity.json: the adversarial inputs of tests/lmms_eval_reference.py with the
values lmms-eval's own installed functions give them (run after `pip install --no-deps lmms-eval==0.7.3`).

    /work/wt/env.sh python scripts/lmms_eval_parity_vectors.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lmms_eval_reference import LMMS_EVAL_VERSION, VECTORS, adversarial_cases, load_reference, reference_outputs  # noqa: E402


def main() -> None:
    from importlib.metadata import version

    installed = version("lmms-eval")
    if installed != LMMS_EVAL_VERSION:
        raise SystemExit(f"lmms-eval {installed} installed, vectors are for {LMMS_EVAL_VERSION}")
    cases = adversarial_cases()
    outputs = reference_outputs(load_reference(), cases)
    data = {"lmms_eval_version": installed, "cases": cases, "expected": outputs}
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(json.dumps(data, ensure_ascii=False, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {VECTORS}: " + ", ".join(f"{k} {len(v)}" for k, v in outputs.items()))


if __name__ == "__main__":
    main()
