"""Bad inputs are rejected before any heavy step, with a message naming the input and its valid range.

Config loading (core.configs.load_config / ConfigJSON.from_json), the cheap checks (core.checks), the first
task of curate (validate_curate_inputs), and the CLI itself (`pyflyte run ... --help` choices, Enum rejection).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.checks import InputError
from core.configs import ConfigError, load_config
from core.dedup.config import DecontamConfig, SemDedupConfig, tiny_dedup_config

ROOT = Path(__file__).resolve().parent.parent
PYFLYTE = str(Path(sys.executable).with_name("pyflyte"))


def test_partial_config_merges_onto_the_preset():
    cfg = SemDedupConfig.from_json(json.dumps({"eps": 0.05}))  # no n_clusters: taken from the preset
    assert cfg.n_clusters == tiny_dedup_config().n_clusters and cfg.eps == 0.05 and cfg.target_removal is None
    cfg = SemDedupConfig.from_json(json.dumps({"target_removal": 0.2, "n_clusters": 3}))
    assert (cfg.n_clusters, cfg.target_removal, cfg.eps) == (3, 0.2, None)


def test_unknown_key_lists_the_valid_ones_with_a_guess():
    with pytest.raises(ConfigError) as e:
        SemDedupConfig.from_json('{"tagret": 0.1}')
    msg = str(e.value)
    assert "'tagret'" in msg and "did you mean 'target_removal'" in msg and "n_clusters" in msg


@pytest.mark.parametrize("bad, field, rng", [({"eps": 1.5}, "eps", "[0, 1)"), ({"n_clusters": 0}, "n_clusters", ">= 1"),
                                             ({"target_removal": 1.2}, "target_removal", "[0, 1]")])
def test_out_of_range_names_field_and_range(bad, field, rng):
    with pytest.raises(ConfigError) as e:
        SemDedupConfig.from_json(json.dumps(bad))
    assert f"{field}=" in str(e.value) and rng in str(e.value)


def test_missing_required_key_without_preset_is_named():
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['n_clusters'\]"):
        load_config(SemDedupConfig, {"eps": 0.1})
    with pytest.raises(ConfigError, match="threshold=2"):
        load_config(DecontamConfig, {"threshold": 2})


def test_validate_task_reports_every_bad_input_at_once(tmp_path):
    from tasks.validate import validate_curate_inputs

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    kw = dict(source=str(empty), image_root=str(tmp_path / "missing"), shard_max_samples=0,
              dedup_config=tiny_dedup_config(), decontaminate=True, eval_cache=str(tmp_path),
              decontam_benchmarks=["docvqa", "docvq"], decontam_config=DecontamConfig(), perplexity=True,
              ppl_low_pct=0.0, ppl_high_pct=150.0, lm_steps=10, reference_source="", reference_image_root="",
              export_max_samples=10)
    with pytest.raises(InputError) as e:
        validate_curate_inputs(**kw)
    msg = str(e.value)
    for needle in ("--source: ", "no record", "--image_root: ", "not an existing folder", "--shard_max_samples: 0",
                   "--ppl_high_pct: 150.0 is out of range; valid: (0.0, 100.0]", "unknown benchmark(s) ['docvq']",
                   "--eval_cache: ", "['docvqa']"):
        assert needle in msg, (needle, msg)


def test_validate_task_accepts_good_inputs(tmp_path):
    from core.demo import generate_demo
    from core.demo.eval_fixtures import write_fixtures
    from tasks.validate import validate_curate_inputs

    generate_demo(str(tmp_path / "d"), n_samples=40, seed=0)
    write_fixtures(str(tmp_path / "ec"))
    out = validate_curate_inputs(
        source=str(tmp_path / "d" / "data.json"), image_root=str(tmp_path / "d" / "images"), shard_max_samples=10,
        dedup_config=tiny_dedup_config(), decontaminate=True, eval_cache=str(tmp_path / "ec"),
        decontam_benchmarks=["docvqa", "chartqa"], decontam_config=DecontamConfig(), perplexity=True,
        ppl_low_pct=0.0, ppl_high_pct=90.0, lm_steps=10, reference_source="", reference_image_root="",
        export_max_samples=10)
    assert out.startswith("inputs ok")


def test_validate_task_checks_format_known_bad_ids_and_inline_image_sources(tmp_path):
    """i13's inputs: the format spec, the known-bad id list, and a WebDataset folder (images inside the
    shards, so no image_root is needed) whose first record is peeked."""
    import io

    import webdataset as wds
    from flytekit.types.file import FlyteFile
    from PIL import Image

    from tasks.validate import validate_curate_inputs

    shards = tmp_path / "shards"
    shards.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, "JPEG")
    with wds.TarWriter(str(shards / "part-0000.tar")) as w:
        w.write({"__key__": "s0", "jpg": buf.getvalue(), "txt": "A red square."})
    ids = tmp_path / "bad.txt"
    ids.write_text("s0\n")
    kw = dict(source=str(shards), image_root="", shard_max_samples=10, dedup_config=tiny_dedup_config(),
              decontaminate=False, eval_cache="", decontam_benchmarks=["docvqa"], decontam_config=DecontamConfig(),
              perplexity=False, ppl_low_pct=0.0, ppl_high_pct=90.0, lm_steps=10, reference_source="",
              reference_image_root="", export_max_samples=10)
    assert validate_curate_inputs(**kw, format="wds", known_bad_ids=FlyteFile(str(ids))).startswith("inputs ok")
    assert validate_curate_inputs(**kw).startswith("inputs ok")  # auto-detected from the .tar extension
    empty_ids = tmp_path / "none.txt"
    empty_ids.write_text("")
    with pytest.raises(InputError) as e:
        validate_curate_inputs(**kw, format="wds:sharegpt", known_bad_ids=FlyteFile(str(empty_ids)))
    msg = str(e.value)
    assert "--format: 'wds:sharegpt' is not a format; valid: auto, json|jsonl|wds|parquet, llava|messages" in msg
    assert f"--known_bad_ids: '{empty_ids}' holds no id" in msg
    # a JSON source names its images relative to image_root: then it is required
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"id": "a", "image": "a.jpg", "conversations": []}) + "\n")
    with pytest.raises(InputError, match="--image_root: is required"):
        validate_curate_inputs(**(kw | {"source": str(src)}))


def _pyflyte_run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([PYFLYTE, "--config", str(ROOT / "flyte.config"), "run", "workflows/curate.py", "curate",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_lists_choices_and_rejects_bad_ones_before_running(tmp_path):
    help_ = _pyflyte_run("--help")
    assert help_.returncode == 0
    assert "tiny|siglip2" in help_.stdout.replace(" ", "") or "siglip2" in help_.stdout
    assert "used more than once" not in help_.stderr  # flytekit's duplicate bool flags, silenced in workflows/
    bad = _pyflyte_run("--source", "x.json", "--image_root", str(tmp_path), "--embed_preset", "siglip3")
    assert bad.returncode != 0 and "siglip3" in bad.stderr and "siglip2" in bad.stderr
    bad = _pyflyte_run("--source", "x.json", "--image_root", str(tmp_path), "--dedup_config", '{"tagret": 0.1}')
    out = " ".join((bad.stderr + bad.stdout).replace("│", " ").split())  # rich wraps the message
    assert bad.returncode != 0 and "did you mean 'target_removal'" in out


def _stage_configs():
    """(class, preset, one out-of-range field with its value and the range the message must show)."""
    from core.embed.config import EmbedConfig, tiny_embed_config
    from core.evals.config import EvalConfig
    from core.export import ExportConfig
    from core.perplexity.config import PerplexityConfig
    from core.perplexity.slices import SliceConfig
    from core.rephrase.config import RephraseConfig
    from core.train.config import TrainConfig

    return [
        (EmbedConfig, tiny_embed_config(), "batch_size", 0, "[1, inf)"),
        (PerplexityConfig, PerplexityConfig(model="m"), "max_padding_waste", 1.5, "[0, 1]"),
        (SliceConfig, SliceConfig(), "high_pct", 150, "(0, 100]"),
        (RephraseConfig, RephraseConfig(backend="transformers", model="m"), "top_p", 0.0, "(0, 1]"),
        (ExportConfig, ExportConfig(), "max_samples", 0, "[1, inf)"),
        (TrainConfig, TrainConfig(output_dir="o", vision_model="v", lm_path="l"), "lr", -0.1, "(0, inf)"),
        (EvalConfig, EvalConfig(cache_dir="c", benchmarks=["docvqa"]), "concurrency", 0, "[1, inf)"),
    ]


@pytest.mark.parametrize("case", _stage_configs(), ids=lambda c: c[0].__name__)
def test_every_stage_config_checks_ranges_and_rejects_unknown_keys(case):
    cls, preset, field, bad, rng = case
    with pytest.raises(ConfigError) as e:
        load_config(cls, {field: bad}, preset)
    assert str(e.value) == f"{cls.__name__}: {field}={bad!r} out of range; valid: {rng}"
    with pytest.raises(ValueError, match=f"{field}={bad!r} out of range"):  # direct construction checks too
        cls(**{**{f: getattr(preset, f) for f in preset.__dataclass_fields__}, field: bad})
    with pytest.raises(ConfigError) as e:
        load_config(cls, json.dumps({"bacth_size": 4}), preset)
    msg = str(e.value)
    assert msg.startswith(f"{cls.__name__}: unknown key(s) 'bacth_size'") and "valid keys: " in msg
    assert set(msg.split("valid keys: ")[1].split(", ")) == set(preset.__dataclass_fields__)
    ok = load_config(cls, {}, preset)  # the preset itself is in range
    assert ok == preset
