"""Bad inputs are rejected before any heavy step, with a message naming the input and its valid range.

Config loading (core.foundation.configs.load_config / ConfigJSON.from_json), the cheap checks (core.runs.checks), the first
task of curate (validate_curate_inputs), CurateConfig, the preset registry and its one override rule, and the CLI
itself (`pyflyte run ... --help`, a bad `--config` rejected before anything runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.foundation.configs import ConfigError, load_config, preset, preset_names
from core.runs.checks import InputError
from core.runs.config import CurateConfig
from core.steps.dedup.config import DecontamConfig, SemDedupConfig, tiny_dedup_config

ROOT = Path(__file__).resolve().parents[2]
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
    cfg = preset(CurateConfig, "demo", decontam=True, decontam_benchmarks=["docvqa", "docvq"])
    kw = dict(source=str(empty), image_root=str(tmp_path / "missing"), config=cfg, eval_cache=str(tmp_path))
    with pytest.raises(InputError) as e:
        validate_curate_inputs(**kw)
    msg = str(e.value)
    for needle in ("--source: ", "no record", "--image_root: ", "not an existing folder",
                   "unknown benchmark(s) ['docvq']", "--eval_cache: ", "['docvqa']"):
        assert needle in msg, (needle, msg)


def test_curate_config_rejects_bad_values_when_built():
    """The numbers of `curate` live in CurateConfig: a bad one stops the build (the CLI's `--config`), naming the
    class, the field and its range; nested configs merge by the same rule and validate themselves."""
    for change, needle in (({"ingest_config": {"shard_max_samples": 0}}, "IngestOptions: shard_max_samples=0 out of range; valid: [1, inf)"),
                           ({"ppl_filter_config": {"high_pct": 150}},
                            "SliceConfig: high_pct=150.0 out of range; valid: (0, 100]"),
                           ({"ppl_filter_config": {"low_pct": 50, "high_pct": 40}}, "low_pct=50.0 must be below"),
                           ({"semdedup_config": {"tagret": 0.1}}, "did you mean 'target_removal'"),
                           ({"embed_config": "siglip3"}, "unknown preset 'siglip3'; valid: tiny, siglip2")):
        with pytest.raises(ConfigError) as e:
            CurateConfig.from_json(json.dumps(change))
        assert needle in str(e.value), (needle, str(e.value))
    cfg = CurateConfig.from_json('{"embed_config": "siglip2", "semdedup_config": {"eps": 0.05}}')
    assert cfg.embed_config.num_gpus == 1 and cfg.semdedup_config.eps == 0.05
    assert cfg.semdedup_config.target_removal is None  # eps set: the preset's target is cleared (_merge_onto)
    assert cfg.semdedup_config.n_clusters == tiny_dedup_config().n_clusters  # the rest from the nested current value
    assert CurateConfig.from_json('{"preset": "mammoth_v1"}') == preset(CurateConfig, "mammoth_v1")


def test_validate_task_accepts_good_inputs(tmp_path):
    from core.demo import generate_demo
    from core.demo.eval_fixtures import write_fixtures
    from tasks.validate import validate_curate_inputs

    generate_demo(str(tmp_path / "d"), n_samples=40, seed=0)
    write_fixtures(str(tmp_path / "ec"))
    cfg = preset(CurateConfig, "demo", ingest_config={"shard_max_samples": 10}, decontam=True,
                 decontam_benchmarks=["docvqa", "chartqa"], lm_steps=10, export_config={"max_samples": 10})
    out = validate_curate_inputs(source=str(tmp_path / "d" / "data.json"), image_root=str(tmp_path / "d" / "images"),
                                 config=cfg, eval_cache=str(tmp_path / "ec"))
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
    kw = dict(source=str(shards), image_root="",
              config=preset(CurateConfig, "demo", ingest_config={"shard_max_samples": 10}, perplexity=False))
    assert validate_curate_inputs(**kw, format="wds", known_bad_ids=FlyteFile(str(ids))).startswith("inputs ok")
    assert validate_curate_inputs(**kw).startswith("inputs ok")  # auto-detected from the .tar extension
    empty_ids = tmp_path / "none.txt"
    empty_ids.write_text("")
    with pytest.raises(InputError) as e:
        validate_curate_inputs(**kw, format="wds:alpaca", known_bad_ids=FlyteFile(str(empty_ids)))
    msg = str(e.value)
    assert "--format: 'wds:alpaca' is not a format; valid: auto, json|jsonl|wds|parquet, llava|messages" in msg
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
    bad = _pyflyte_run("--source", "x.json", "--image_root", str(tmp_path), "--config", '{"embed_config": "siglip3"}')
    out = " ".join((bad.stderr + bad.stdout).replace("│", " ").split())  # rich wraps the message
    assert bad.returncode != 0 and "siglip3" in out and "siglip2" in out
    bad = _pyflyte_run("--source", "x.json", "--image_root", str(tmp_path), "--config",
                       '{"semdedup_config": {"tagret": 0.1}}')
    out = " ".join((bad.stderr + bad.stdout).replace("│", " ").split())
    assert bad.returncode != 0 and "did you mean 'target_removal'" in out


def _stage_configs():
    """(class, preset, one out-of-range field with its value and the range the message must show)."""
    from core.evals.config import EvalConfig
    from core.steps.embed.config import EmbedConfig, tiny_embed_config
    from core.steps.export import ExportConfig
    from core.steps.perplexity.config import PerplexityConfig
    from core.steps.perplexity.slices import SliceConfig
    from core.steps.rephrase.config import RephraseConfig
    from core.train.config import TrainConfig

    return [
        (EmbedConfig, tiny_embed_config(), "batch_size", 0, "[1, inf)"),
        (PerplexityConfig, PerplexityConfig(model="m"), "max_padding_waste", 1.5, "[0, 1]"),
        (SliceConfig, SliceConfig(), "high_pct", 150.0, "(0, 100]"),
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


def test_one_preset_registry_and_one_override_rule():
    """Every stage config registers its presets in core.foundation.configs; `override` is the one rule: a given key replaces
    its field (None included: it is a value, not "keep"), unknown keys are rejected, the class validates."""
    from core.foundation.configs import override
    from core.steps.embed.config import EmbedConfig, siglip2_embed_config
    from core.steps.perplexity.config import PerplexityConfig
    from core.steps.perplexity.slices import SliceConfig
    from core.steps.rephrase.config import RephraseConfig
    from core.train.config import TrainConfig

    names = {c.__name__: preset_names(c) for c in (EmbedConfig, PerplexityConfig, SliceConfig, RephraseConfig,
                                                    TrainConfig, SemDedupConfig, DecontamConfig, CurateConfig)}
    assert names == {"EmbedConfig": ["tiny", "siglip2"], "PerplexityConfig": ["tiny", "qwen0.5b", "reference"],
                     "SliceConfig": ["p90", "deciles"], "RephraseConfig": ["tiny", "qwen"],
                     "TrainConfig": ["default", "tiny", "llava_stage1", "llava_stage2"],
                     "SemDedupConfig": ["tiny", "paper", "target10"], "DecontamConfig": ["default", "tiny"],
                     "CurateConfig": ["demo", "mammoth_v1"]}
    sig = preset(EmbedConfig, "siglip2", cache_dir="/models")
    assert sig == siglip2_embed_config(cache_dir="/models")
    assert override(sig, cache_dir=None).cache_dir is None  # None is a value
    assert override(preset(TrainConfig, "tiny"), max_steps=None).max_steps is None
    with pytest.raises(ConfigError, match="unknown key"):
        override(sig, bacth_size=4)
    with pytest.raises(ConfigError, match="device='cpu' with num_gpus > 0"):  # validated again
        override(sig, device="cpu")
    with pytest.raises(ConfigError, match="unknown preset 'huge'; valid: tiny, qwen"):
        preset(RephraseConfig, "huge")


def test_train_configs_cross_the_flyte_boundary_whole():
    """TrainConfig (alone and nested in AblateConfig) survives flytekit's type engine, None/float fields included;
    the mixing base's config is the default preset with the MixingConfig's training fields."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    from core.mixing.pipeline import base_train_config, tiny_mixing_config
    from core.runs.config import AblateConfig
    from core.train.config import TrainConfig

    ctx = FlyteContextManager.current_context()
    cases = [(TrainConfig, preset(TrainConfig, name, max_steps=30)) for name in preset_names(TrainConfig)]
    cases += [(TrainConfig, preset(TrainConfig, "llava_stage2", init_from="/ckpt", vision_pretrained="w.bin")),
              (AblateConfig, preset(AblateConfig, "tiny", train_config={"epochs": 2, "lr": 3})),
              (AblateConfig, preset(AblateConfig, "tiny", train_config="llava_stage1"))]
    for cls, cfg in cases:
        lit = TypeEngine.to_literal(ctx, cfg, cls, TypeEngine.to_literal_type(cls))
        assert TypeEngine.to_python_value(ctx, lit, cls) == cfg
    assert cases[-2][1].train_config.lr == 3.0 and cases[-2][1].train_config.max_steps is None
    assert AblateConfig().train_config == preset(TrainConfig, "default")
    mix = tiny_mixing_config()
    assert base_train_config(mix, 0) == preset(TrainConfig, "default", batch_size=mix.batch_size, lr=mix.lr,
                                               max_seq_len=mix.max_seq_len, val_size=mix.val_size, device=mix.device)
    assert base_train_config(mix, 20).max_steps == 20
