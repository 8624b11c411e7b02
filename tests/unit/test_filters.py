"""The per-sample filter base (core/steps/filters/base.py) and the image filter written with it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from core.foundation.configs import ConfigError, load_config, preset
from core.foundation.ledger import read_ledger
from core.foundation.sample import Sample, SampleError
from core.foundation.step import Passing, StepMismatch
from core.io.wds import write_shards
from core.steps.filters import FILTERS, SampleFilter, filter_class, run_filter
from core.steps.filters.image_filter import ImageFilter, ImageFilterConfig
from core.steps.filters.report import filter_counts, filter_report_html
from tests.capped import run_capped


def png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 0 if mode == "1" else (120, 40, 200)).save(buf, "PNG")
    return buf.getvalue()


def sample(sid: str, *images: bytes) -> Sample:
    q = "<image>\n" * len(images) + "What is shown?"
    s = Sample.from_record({"id": sid, "image": [f"{sid}.{i}.png" for i in range(len(images))],
                            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "A shape."}]})
    s.image_bytes = list(images)
    return s


def shards(tmp_path: Path, samples: list[Sample], per_shard: int = 100) -> list[str]:
    return [i.path for i in write_shards(samples, str(tmp_path / "shards"), max_samples=per_shard)]


def rows(out: Path, step: str) -> dict[str, tuple]:
    df = read_ledger(out / "ledger" / step)
    assert df["sample_id"].is_unique, "a sample decided twice"
    return {r.sample_id: (r.decision, r.reason, r.score) for r in df.itertuples()}


# ---- the image filter -------------------------------------------------------------------------------------------
def test_image_filter_decides_every_kind_of_sample(tmp_path):
    good = png(64, 48)
    truncated = png(64, 64)[:60]
    samples = [
        sample("normal", good),
        sample("tiny", png(10, 300)),  # short side 10 < 28
        sample("tall", png(30, 6300)),  # ratio 210 > 200
        sample("edge", png(28, 5600)),  # ratio exactly 200, short side exactly 28: kept
        sample("garbage", b"\x89PNG\r\n\x1a\n not really a png"),
        sample("truncated", truncated),
        sample("text_only"),
        sample("multi_ok", good, png(120, 40)),  # worst ratio 3
        sample("multi_one_tiny", good, png(20, 20)),  # one bad image drops the whole conversation
        sample("multi_one_long", png(300, 1), good),  # 300x1: short side 1 -> too small wins over the ratio
    ]
    out = tmp_path / "out"
    summary = run_filter("image_filter", shards(tmp_path, samples, per_shard=4), out)
    got = rows(out, "image_filter")
    assert set(got) == {s.id for s in samples}
    assert got["normal"] == ("keep", "", pytest.approx(64 / 48))
    assert got["tiny"] == ("drop", "image_too_small", pytest.approx(30.0))
    assert got["tall"] == ("drop", "image_aspect_ratio", pytest.approx(210.0))
    assert got["edge"] == ("keep", "", pytest.approx(200.0))
    assert got["garbage"][:2] == ("quarantine", "corrupt_image")
    assert got["truncated"][:2] == ("quarantine", "corrupt_image")
    assert got["text_only"][:2] == ("keep", "") and got["text_only"][2] != got["text_only"][2]  # NaN: no score
    assert got["multi_ok"] == ("keep", "", pytest.approx(3.0))
    assert got["multi_one_tiny"][:2] == ("drop", "image_too_small")
    assert got["multi_one_long"][:2] == ("drop", "image_too_small")
    assert summary["counts"] == {"keep": 4, "drop": 4, "quarantine": 2, "modify": 0}
    assert summary["n_units"] == 3
    assert {k: v for k, v in summary["config"].items() if k != "fanout"} == {"min_side": 28, "max_aspect": 200.0}


def test_image_filter_config_presets_and_ranges(tmp_path):
    assert load_config(ImageFilterConfig, None) == ImageFilterConfig(28, 200.0)
    assert ImageFilterConfig.from_json('{"min_side": 64}') == ImageFilterConfig(64, 200.0)
    assert ImageFilterConfig.from_json('{"preset": "datacomp"}') == ImageFilterConfig(200, 3.0)
    assert preset(ImageFilterConfig, "cc3m") == ImageFilterConfig(401, 2.0)
    with pytest.raises(ValueError, match=r"min_side=0 out of range"):
        ImageFilterConfig(min_side=0)
    with pytest.raises(ValueError, match=r"max_aspect=0.5 out of range"):
        ImageFilterConfig(max_aspect=0.5)
    with pytest.raises(ConfigError, match="did you mean 'max_aspect'"):
        ImageFilterConfig.from_json('{"max_aspec": 3}')
    # a stricter preset on the same samples: the thresholds are the ones applied
    samples = [sample("a", png(250, 250)), sample("b", png(150, 150)), sample("c", png(700, 220))]
    run_filter("image_filter", shards(tmp_path, samples), tmp_path / "out", '{"preset": "datacomp"}')
    got = rows(tmp_path / "out", "image_filter")
    assert [got[k][:2] for k in "abc"] == [("keep", ""), ("drop", "image_too_small"), ("drop", "image_aspect_ratio")]


def test_image_bomb_is_quarantined_without_decoding(tmp_path):
    """A 10,000 x 10,000 PNG (100 MP > Pillow's 89.5 MP bound): quarantined from its header, in a capped child."""
    bomb = png(10_000, 10_000, mode="1")  # a few kB on disk, 300 MB as RGB
    urls = shards(tmp_path, [sample("bomb", bomb), sample("ok", png(64, 64))])

    def go(out: str) -> dict:
        run_filter("image_filter", urls, out)
        return {k: v[:2] for k, v in rows(Path(out), "image_filter").items()}

    res = run_capped(go, str(tmp_path / "out"), headroom_mb=2048, timeout_s=120)
    assert res.value == {"bomb": ("quarantine", "decompression_bomb"), "ok": ("keep", "")}
    assert res.grown_mb < 250, res


# ---- the base -------------------------------------------------------------------------------------------------
class Picky(SampleFilter):
    """A test filter: raises, returns malformed verdicts or a SampleError for some ids, keeps the rest."""

    name = "test_picky"
    calls: list[str] = []

    def decide(self, s: Sample):
        Picky.calls.append(s.id)
        if s.id.startswith("boom"):
            return 1 / 0
        if s.id.startswith("badword"):
            return ("remove", "x", 1.0)  # not a decision
        if s.id.startswith("noreason"):
            return ("drop", "", 1.0)
        if s.id.startswith("pair"):
            return ("keep", "")
        if s.id.startswith("nan"):
            return ("keep", "", float("nan"))
        if s.id.startswith("serr"):
            raise SampleError("odd_input", "the filter recognised bad input")
        if s.id.startswith("drop"):
            return ("drop", "test_reason", 2.5)
        return ("keep", "", len(s.id))


def test_decide_that_raises_or_misbehaves_quarantines_and_never_crashes(tmp_path):
    ids = ["boom1", "badword1", "noreason1", "pair1", "nan1", "serr1", "drop1", "fine1", "fine22"]
    out = tmp_path / "out"
    summary = run_filter("test_picky", shards(tmp_path, [sample(i) for i in ids], per_shard=5), out)
    got = rows(out, "test_picky")
    assert got["boom1"][:2] == ("quarantine", "filter_error:ZeroDivisionError")
    for i in ("badword1", "noreason1", "pair1", "nan1"):
        assert got[i][:2] == ("quarantine", "filter_error:FilterResultError"), i
    assert got["serr1"][:2] == ("quarantine", "odd_input")
    assert got["drop1"] == ("drop", "test_reason", 2.5)
    assert got["fine1"] == ("keep", "", 5.0) and got["fine22"] == ("keep", "", 6.0)
    df = read_ledger(out / "ledger" / "test_picky").set_index("sample_id")
    assert "ZeroDivisionError: division by zero" in df.loc["boom1", "extra"]  # the message travels with the row
    assert summary["reasons"]["filter_error:FilterResultError"] == 4
    assert summary["counts"] == {"keep": 2, "drop": 1, "quarantine": 6, "modify": 0}


def test_every_input_id_gets_exactly_one_row(tmp_path):
    """Only the previous step's ids are decided; an id no shard holds is quarantined, none is lost or doubled."""
    samples = [sample(f"s{i:02d}", png(40, 40)) for i in range(12)] + [sample("tall", png(30, 6300))]
    urls = shards(tmp_path, samples, per_shard=5)
    (tmp_path / "shards" / "junk.tar").write_bytes(b"not a tar at all" * 10)  # a broken unit in the input list
    prev_ids = [f"s{i:02d}" for i in range(0, 12, 2)] + ["tall", "ghost"]
    out = tmp_path / "out"
    summary = run_filter("image_filter", urls + [str(tmp_path / "shards" / "junk.tar")], out,
                         prev=Passing.of(prev_ids, "ingest"))
    got = rows(out, "image_filter")
    assert set(got) == set(prev_ids)  # exactly the inputs: no extra, none missing
    assert got["ghost"][:2] == ("quarantine", "missing_from_shard") and summary["missing"] == 1
    assert got["tall"][:2] == ("drop", "image_aspect_ratio")
    assert all(got[i][:2] == ("keep", "") for i in prev_ids[:6])
    c = filter_counts(out / "ledger" / "image_filter")
    assert c["inputs"] == len(prev_ids) and c["decisions"]["keep"] == 6


def test_resume_skips_finished_units_and_refuses_another_config(tmp_path):
    samples = [sample(f"r{i:02d}") for i in range(9)]
    urls = shards(tmp_path, samples, per_shard=3)
    out = tmp_path / "out"
    Picky.calls.clear()
    Picky(out).run(urls)
    assert len(Picky.calls) == 9
    (out / "ledger" / "test_picky" / "part-shard-000001.parquet").unlink()  # as if killed during shard 2
    Picky.calls.clear()
    s = Picky(out).run(urls)
    assert Picky.calls == ["r03", "r04", "r05"] and s.done == ["shard-000001"] and len(s.skipped) == 2
    assert len(rows(out, "test_picky")) == 9

    img = [sample(f"i{i}", png(40, 40)) for i in range(4)]
    iurls = [i.path for i in write_shards(img, str(tmp_path / "ishards"), max_samples=2)]
    ImageFilter(tmp_path / "iout").run(iurls)
    with pytest.raises(StepMismatch, match="min_side: 28 -> 64"):
        ImageFilter(tmp_path / "iout", ImageFilterConfig(min_side=64)).run(iurls)


def test_registry_finds_filters_by_name_and_refuses_a_second_owner():
    assert filter_class("image_filter") is ImageFilter and FILTERS["test_picky"] is Picky
    with pytest.raises(ValueError, match="registered: .*image_filter"):  # the message lists what is registered
        filter_class("no_such_filter")
    with pytest.raises(TypeError, match="taken by"):
        type("Impostor", (SampleFilter,), {"name": "image_filter", "decide": lambda self, s: ("keep", "", None)})
    assert FILTERS["image_filter"] is ImageFilter


class Forgetful(SampleFilter):
    """Reads image sizes without asking for images: every image sample must come out as a loud filter error."""

    name = "test_forgetful"

    def decide(self, s: Sample):
        return "keep", "", float(len(self.image_sizes(s)))


def test_a_filter_that_forgets_needs_images_fails_loudly_not_silently(tmp_path):
    out = tmp_path / "out"
    run_filter("test_forgetful", shards(tmp_path, [sample("img", png(40, 40)), sample("txt")]), out)
    got = rows(out, "test_forgetful")
    assert got == {"img": ("quarantine", "filter_error:ValueError", got["img"][2]),
                   "txt": ("quarantine", "filter_error:ValueError", got["txt"][2])}


def test_report_escapes_ids_and_reasons():
    counts = {"inputs": 2, "decisions": {"keep": 1, "drop": 1, "quarantine": 0, "modify": 0},
              "reasons": {"<b>why</b>": {"decision": "drop", "n": 1, "examples": [["<script>x</script>", 3.0]]}}}
    html = filter_report_html("image_filter", counts, {"min_side": "<i>"})
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;why" in html and "&lt;i&gt;" in html
    assert "50.0%" in html
