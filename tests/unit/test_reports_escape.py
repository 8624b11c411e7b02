"""Reports escape every data-derived string: HTML (the decks show in the Flyte console: stored XSS) and
matplotlib text (`$...$` in a label is mathtext: an undefined macro raised while saving the figure, after all
of a step's work). Each report module that writes data into HTML or plot labels is fed hostile names here."""

from __future__ import annotations

import io
import logging
import types

import numpy as np
import pandas as pd
import pytest

from core.foundation.report import deck_page, esc, figure_html, new_figure, plot_text, table_html, text_html

XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
MACRO = r"$\undefinedmacro$"
FALLBACK = "did not parse as mathtext"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def report_log():
    """core.foundation.report's warnings (a handler on the logger itself: core.foundation.log may stop "core" from propagating)."""
    h = _Records()
    logger = logging.getLogger("core.foundation.report")
    logger.addHandler(h)
    try:
        yield h.messages
    finally:
        logger.removeHandler(h)


@pytest.fixture
def no_fallback(report_log):
    """Fails the test when a figure needed figure_html's literal-text fallback: the labels were not escaped."""
    yield
    assert not [m for m in report_log if FALLBACK in m], "a data label reached matplotlib unescaped"


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _no_raw_script(html: str) -> None:
    assert "<script" not in html.lower(), "raw <script> from the data in the report"


def test_plot_text_renders_any_string_literally():
    fig, ax = new_figure()
    for s in (MACRO, r"a\$b", "a\\b", "$5 and $6", "x\\", "50%_{x}^2"):
        t = ax.text(0, 0, plot_text(s))
        assert t._preprocess_math(t.get_text()) == (s, False)  # drawn as written, no mathtext
    figure_html(fig)


def test_figure_html_survives_an_unescaped_label_and_says_so(report_log):
    fig, ax = new_figure()
    ax.plot([1, 2], [1, 2], label=MACRO)  # what a module that forgot plot_text would do
    ax.set_yscale("log")
    ax.legend()
    out = figure_html(fig, "raw")
    assert out.startswith("<h3>raw</h3><img src=\"data:image/png;base64,")
    assert any(FALLBACK in m for m in report_log)


def test_core_html_helpers_escape():
    for html in (table_html([{XSS: XSS}], XSS), text_html(XSS, XSS), figure_html(new_figure()[0], XSS),
                 deck_page(XSS, [(XSS, text_html(XSS))])):
        _no_raw_script(html)
        assert XSS_ESCAPED in html
    assert esc('"q" & <b>') == "&quot;q&quot; &amp; &lt;b&gt;"


def test_targeted_deck_escapes_subgroup_names_in_html_and_plots(no_fallback):
    from core.targeted.report import funnel_html, generation_html, retrieval_html, subgroups_html

    for name in (XSS, MACRO):
        ref = pd.DataFrame({"ref_id": ["a", "b", "c"], "shard": "s", "subgroup": [name, name, ""],
                            "family": ["counting", "counting", ""], "question": ["Q1", "Q2", "Q3"],
                            "answer": ["1", "2", "3"], "used": [True, True, False], "reason": ["", "", MACRO]})
        got = pd.DataFrame({"subgroup": [name, name, "other"], "pool_id": ["p1", "p2", "p3"],
                            "similarity": [0.9, 0.8, 0.7], "rank": [0, 1, 0]})

        def fetch(ids):
            return {i: types.SimpleNamespace(image_bytes=[_png()]) for i in ids}

        gens = pd.DataFrame({"gen_id": ["g1", "g2"], "subgroup": name, "raw": [XSS, "x"],
                             "reason": ["", f"gen_rejected:{name}"], "conversations_json": ["[]", ""]})
        summary = {"retrieved": 3, "generation": {"n_retrieved": 3, "n_accepted": 1,
                                                  "rejected_by_reason": {f"gen_rejected:{name}": 1}},
                   "filters": {"tg_dedup": {"inputs": 1, "passed": 1, "reasons": {name: 1}}}, "exported": 1}
        html = "".join([subgroups_html(ref), retrieval_html(got, fetch), generation_html(gens), funnel_html(summary)])
        if name == XSS:
            _no_raw_script(html)
            assert f"<h3>{XSS_ESCAPED}</h3>" in html  # the retrieval gallery's heading, once written raw


def test_embed_deck_renders_a_mathtext_source(tmp_path, no_fallback):
    from core.steps.embed.report import embed_report_html
    from core.steps.embed.store import build_table, table_bytes

    n, dim = 12, 8
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [{"sample_id": f"s{i}", "source": MACRO if i % 2 else XSS, "n_images": 1, "image_start": i}
            for i in range(n)]
    cfg = types.SimpleNamespace(out_dtype="float32", embeds_images=True, embeds_texts=False, model_name="m",
                                pretrained="", seed=0, text_view="question", what="image")
    table = build_table(rows, image_vecs=vecs, image_norms=np.ones(n, np.float32), text_vecs=None, text_norms=None,
                        cfg=cfg, dim=dim)
    (tmp_path / "shard-000000.parquet").write_bytes(table_bytes(table))
    ledger = pd.DataFrame({"decision": ["quarantine"], "reason": [XSS]})
    html = embed_report_html(tmp_path, {"model": XSS}, [{"shard": XSS, "n_kept": n}], ledger)
    assert "coloured by source" in html  # the PCA scatter whose legend names the sources was drawn
    _no_raw_script(html)


def _eval_rows(variant: str, bench: str) -> list[dict]:
    return [{"checkpoint": f"c{s}", "checkpoint_name": f"c{s}", "variant": variant, "step": s, "epoch": None,
             "benchmark": bench, "metric": MACRO, "score": s / 10, "score_stderr": 0.01, "status": "ok"}
            for s in (1, 2)]


def test_eval_and_ablation_decks_render_mathtext_names(no_fallback):
    from core.evals.report import score_vs_step_html
    from core.runs.ablation_compare import Comparison, comparison_html

    long = pd.DataFrame(_eval_rows(MACRO, MACRO) + _eval_rows(XSS, "docvqa"))
    assert "<img" in score_vs_step_html(long)
    table = pd.DataFrame([{"variant": MACRO, MACRO: 0.2, "docvqa": 0.1}, {"variant": XSS, MACRO: 0.3, "docvqa": 0.2}])
    html = comparison_html(Comparison(table, long))
    assert "scores by variant" in html
    _no_raw_script(html)


def test_mixing_deck_renders_mathtext_domains_and_benchmarks(no_fallback):
    from core.mixing.analysis import analyze, mixing_report_html

    domains = [MACRO, XSS, "c"]
    subsets = ["+".join(sorted(s)) for s in ([MACRO], [XSS], ["c"], [MACRO, XSS], [MACRO, "c"], [XSS, "c"],
                                               [MACRO, XSS, "c"])]
    rng = np.random.default_rng(0)
    table = pd.DataFrame({MACRO: rng.random(len(subsets)), "docvqa": rng.random(len(subsets))}, index=subsets)
    table["overall"] = table.mean(axis=1)
    html = mixing_report_html(table, domains, analyze(table, domains), extra={XSS: MACRO})
    assert "Per-domain marginal contribution" in html
    _no_raw_script(html)


def test_export_deck_renders_mathtext_reasons(no_fallback):
    from core.steps.export import export_report_html

    manifest = {"selection": "kept", "subset": "", "n_samples": 3, "n_shards": 1, "n_bytes": 1000, "n_rephrased": 0,
                "n_kept_by_last_step": 3, "subset_outside_kept": 0, "rephrase_fallbacks": {XSS: 1},
                "loader_schema": {"image_format": "jpg"},
                "removed_by_step": [{"step": "semdedup", "inputs": 5, "kept": 3, "modified": 0, "removed": 2,
                                     "by_reason": [{"reason": MACRO, "count": 1}, {"reason": XSS, "count": 1}]}],
                "shards": [{"name": "shard-000000.tar", "n_samples": 3, "n_bytes": 1000, "sha256": "ab" * 32}]}
    html = export_report_html(manifest)
    assert "removed by step and reason" in html
    _no_raw_script(html)


def test_run_index_escapes_step_names_reasons_and_config(no_fallback):
    from core.runs.index import run_index_html

    counts = pd.DataFrame([{"step": "ingest", "inputs": 5, "kept": 4, "modified": 0, "dropped": 0, "quarantined": 1},
                           {"step": MACRO, "inputs": 4, "kept": 3, "modified": 0, "dropped": 1, "quarantined": 0}])
    reasons = pd.DataFrame([{"step": "ingest", "decision": "quarantine", "reason": XSS, "count": 1},
                            {"step": MACRO, "decision": "drop", "reason": MACRO, "count": 1}])
    summary = {"sentence": XSS, "source_accounting": {"source_records": 5},
               "known_bad": {"n_ids": 1, "per_step": [{"step": XSS, "entered": 1}]}}
    html = run_index_html(summary, counts, reasons, ["ingest", XSS], {"source": XSS}, {"git": XSS})
    _no_raw_script(html)
    assert html.count(XSS_ESCAPED) >= 4 and 'href="%3Cscript%3Ealert%281%29%3C/script%3E.html"' in html
