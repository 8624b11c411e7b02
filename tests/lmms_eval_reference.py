"""lmms-eval's own scoring functions, loaded from its installed source without importing the package (its
`__init__` pulls in loguru, datasets, evaluate, ... which mmcurate does not pin), and the adversarial inputs
the parity tests score with them and with core/evals/exact.py.

lmms-eval is installed for this with `pip install --no-deps lmms-eval==0.7.3` (not a project dependency:
its ~50 requirements include a wandb pin and torch>=2.1 ranges). The vectors it produced are committed in
tests/data/lmms_eval_parity.json (scripts/lmms_eval_parity_vectors.py), so the parity test runs without it.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import random
import sys
import types
import warnings
from pathlib import Path
from typing import Any

LMMS_EVAL_VERSION = "0.7.3"
VECTORS = Path(__file__).parent / "data" / "lmms_eval_parity.json"


def lmms_eval_root() -> Path | None:
    """The installed lmms_eval package directory (found without importing it), or None."""
    spec = importlib.util.find_spec("lmms_eval")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _functions(path: Path, names: list[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute only the named top-level functions of a source file (decorators removed), verbatim."""
    with warnings.catch_warnings():  # lmms-eval's own source has a non-raw "\s" (DeprecationWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(path.read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    for n in keep:
        n.decorator_list = []
    missing = set(names) - {n.name for n in keep}
    if missing:
        raise LookupError(f"{path}: no function {sorted(missing)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        code = compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec")
    exec(code, namespace)
    return {k: namespace[k] for k in names}


def load_reference() -> dict[str, Any]:
    """lmms-eval's functions: anls, relaxed_correctness, countbench_process_results,
    realworldqa_process_results, extract_mcq_answer. Raises ModuleNotFoundError when not installed."""
    root = lmms_eval_root()
    if root is None:
        raise ModuleNotFoundError("lmms_eval is not installed (pip install --no-deps lmms-eval==0.7.3)")
    mcq = _load_file(root / "tasks/_task_utils/mcq_extract.py", "lmms_eval.tasks._task_utils.mcq_extract")
    ref: dict[str, Any] = {"extract_mcq_answer": mcq.extract_mcq_answer}
    ref.update(_functions(root / "api/metrics.py", ["levenshtein_distance", "anls"], {}))
    ref["relaxed_correctness"] = _load_file(root / "tasks/chartqa/utils.py", "_lmms_chartqa").relaxed_correctness
    cb = _load_file(root / "tasks/countbench/utils.py", "_lmms_countbench")
    ref["countbench_process_results"] = cb.countbench_process_results
    rw = _functions(root / "tasks/realworldqa/utils.py", ["realworldqa_process_results"], {})
    process = rw["realworldqa_process_results"]

    def realworldqa(doc, results):  # its lazy import finds the file-loaded extractor
        saved = sys.modules.get(mcq.__name__)
        sys.modules[mcq.__name__] = mcq
        try:
            return process(doc, results)
        finally:
            if saved is None:
                sys.modules.pop(mcq.__name__, None)
            else:
                sys.modules[mcq.__name__] = saved

    ref["realworldqa_process_results"] = realworldqa
    return ref


# ---- adversarial inputs -----------------------------------------------------------------------------------


def _decorate(core: str, rng: random.Random) -> str:
    """One perturbation of an answer the way models write them."""
    forms = [
        core, f" {core} ", f"\t{core}\n", core.upper(), core.lower(), core.title(), f"{core}.", f"{core}!",
        f"{core},", f"**{core}**", f"\\boxed{{{core}}}", f"Answer: {core}", f"The answer is {core}.", f'"{core}"',
        f"{core}\n\nExplanation: see the image.", core.replace(" ", "  "), core.replace(" ", "\u00a0"),
        core + "\u200b", f"({core})", f"{core}%", f"{core} %", core[:-1], core[1:], "", "   ", "\n",
        core.replace("0", "O"), f"ß{core}", f"İ{core}", f"{core}\u0301", f"ｆｕｌｌ{core}",
    ]  # fmt: skip
    return rng.choice(forms)


ANLS_REFS = ["42", "Hello World", "straße", "İstanbul", "ﬁnal report", "  spaced   out  ", "1,000", "$12.50",
             "Dr. John Smith", "12/03/1998", "ITC LIMITED", "a", "", "Ünïcödé", "tab\there", "50%", "1e3",
             "Total Revenue (USD)", "x" * 40, "日本語テキスト"]  # fmt: skip
CHART_TARGETS = ["12", "0", "0.0", "45%", "50", "0.5", "1e3", "1000", "1,000", "-3.5", "Yes", "no", "nan", "inf",
                 "  7 ", "٣", "1_000", "12.", "100%", "0%", "2019", "Brazil", "3.14159", "1e-3", ""]  # fmt: skip
CHART_PREDS = ["12", "12.6", "12.61", "11.4", "11.39", " 12", "12 ", "12.", "**12**", "\\boxed{12}", "0", "0.0",
               "-0", "45", "45%", "0.45", "50%", "50%%", "0.5", "1e3", "1E3", "1000", "1,000", "1000.0", "1_000",
               "-3.5", "3.5", "yes", "YES", "Yes.", "nan", "NaN", "inf", "-inf", "7", "٣", "3", "２０１９", "2019",
               "brazil", "Brazil ", "π", "3.14", "0.001", "1e-3", "", " ", "%", "12\n", "twelve"]  # fmt: skip
COUNT_TARGETS = [0, 1, 2, 3, 7, 10, 12, 20, 21]
COUNT_PREDS = ["3", " 3 ", "3.", "three", "Three", " THREE ", "three.", "3 apples", "There are 3.", "03", "3.0",
               "**3**", "\\boxed{3}", "٣", "３", "none", "None", "zero", "0", "nothing", "", "  ", "seven", "twenty",
               "twenty-one", "21", "twelve", "ten", "10", "1", "one", "One.", "2", "two", "a couple", "7\n",
               "\t7", "seven\n", "twenty one", "2 0"]  # fmt: skip
MCQ_PREDS = ["A", "B", "C", "D", "E", "a", "b", "(B)", "B.", "B)", "B:", "B ", " B", "b.", "**B**", "\\boxed{B}",
             "Answer: C", "The answer is B", "the answer is b", "The correct answer is (D).", "I choose A",
             "My answer is C.", "Answer is: D", "A or B", "Between A and B, I pick B",
             "I think (A) is wrong, the final answer is D.", "B. The red car", "B) red car", "C: left lane",
             "The car is red. B", "Option B", "option c", "答案是B", "选C", "정답은 A", "답: D", "答えはB",
             "İ answer is C", "İİİ the answer is B", "A.B.C", "ABC", "BAD", "CAB", "DAB.", "Apple", "Banana.",
             "Definitely", "Cannot determine", "None of the above", "", "   ", ".", "?!", "\"B\"", "'C'",
             "B,", ",B", ";D;", "(C", "C)", "Answer:\nB", "The answer is\nC", "Both A and C are possible; C",
             "[B]", "{B}", "<B>", "B\n\nExplanation: A car is on the left.", "1", "0", "Downhill", "downhill.",
             "Yes", "yes.", "No", "2", "two", "Right", "left"]  # fmt: skip
MCQ_ANSWERS = ["A", "B", "C", "D", " b ", "c", "0", "2", "Downhill", "Yes", "No", "left"]


def adversarial_cases(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Deterministic inputs per metric (several hundred each)."""
    rng = random.Random(seed)
    anls = []
    for i in range(600):
        refs = rng.sample(ANLS_REFS, rng.choice([1, 1, 2, 3]))
        base = rng.choice(refs + ANLS_REFS)
        pred = _decorate(base, rng) if i % 5 else _decorate(_decorate(base, rng), rng)
        anls.append({"prediction": pred, "references": refs})
    chart = [{"prediction": p, "target": t} for t, p in itertools.product(CHART_TARGETS, CHART_PREDS)]
    chart += [{"prediction": _decorate(t, rng), "target": t} for t in CHART_TARGETS for _ in range(8)]
    count = [{"prediction": p, "target": t} for t, p in itertools.product(COUNT_TARGETS, COUNT_PREDS)]
    mcq = [{"prediction": p, "answer": a} for a, p in itertools.product(MCQ_ANSWERS, MCQ_PREDS)]
    extract = [{"prediction": p} for p in MCQ_PREDS] + [{"prediction": _decorate(rng.choice("ABCD"), rng)}
                                                         for _ in range(200)]  # fmt: skip
    return {"anls": anls, "relaxed_correctness": chart, "countbench": count, "realworldqa": mcq,
            "extract_mcq_answer": extract}  # fmt: skip


def reference_outputs(ref: dict[str, Any], cases: dict[str, list[dict[str, Any]]]) -> dict[str, list[Any]]:
    """lmms-eval's value for every case."""
    return {
        "anls": [ref["anls"](c["references"], [c["prediction"]])["anls"] for c in cases["anls"]],
        "relaxed_correctness": [bool(ref["relaxed_correctness"](c["prediction"], c["target"]))
                                for c in cases["relaxed_correctness"]],
        "countbench": [ref["countbench_process_results"]({"number": c["target"]}, [c["prediction"]])["acc"]
                       for c in cases["countbench"]],
        "realworldqa": [ref["realworldqa_process_results"]({"answer": c["answer"]}, [c["prediction"]])["exact_match"]
                        for c in cases["realworldqa"]],
        "extract_mcq_answer": [ref["extract_mcq_answer"](c["prediction"]) for c in cases["extract_mcq_answer"]],
    }  # fmt: skip
