"""Soup arithmetic on small safetensors checkpoint folders (both layouts: trainer-style files and one HF file)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.mixing.merge import merge_checkpoints, normalize_weights
from core.mixing.soups import HoldLog, SoupStore, parse_soup_uri, peak_held, soup_uri


def _ckpt(root, name, seed, frozen, layout="trainer"):
    g = torch.Generator().manual_seed(seed)
    d = root / name
    d.mkdir(parents=True)
    proj = {"0.weight": torch.randn(4, 3, generator=g), "0.bias": torch.randn(4, generator=g)}
    lm = {"embed.weight": torch.randn(6, 4, generator=g), "pos_ids": torch.arange(6)}
    if layout == "trainer":
        save_file(frozen, str(d / "vision_tower.safetensors"))
        save_file(proj, str(d / "projector.safetensors"))
        (d / "lm").mkdir()
        save_file(lm, str(d / "lm" / "model.safetensors"))
        (d / "lm" / "config.json").write_text("{}")
        (d / "mini_llava.json").write_text(json.dumps({"format": 1}))
        (d / "optimizer.pt").write_bytes(b"not copied")
    else:  # one HF file with prefixed names
        sd = {**{f"vision_tower.{k}": v for k, v in frozen.items()}, **{f"projector.{k}": v for k, v in proj.items()},
              **{f"language_model.{k}": v for k, v in lm.items()}}
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    return d


def _all(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if f.endswith(".safetensors"):
                for k, v in load_file(os.path.join(root, f)).items():
                    out[os.path.relpath(os.path.join(root, f), d) + ":" + k] = v
    return out


@pytest.fixture(params=["trainer", "hf"])
def experts(tmp_path, request):
    frozen = {"w": torch.randn(5, 5)}
    return [_ckpt(tmp_path, f"e{i}", i, frozen, request.param) for i in range(3)], tmp_path


def test_soup_of_one_expert_is_that_expert(experts):
    eps, tmp = experts
    merge_checkpoints([eps[1]], tmp / "soup")
    a, b = _all(eps[1]), _all(tmp / "soup")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (tmp / "soup" / "optimizer.pt").exists()
    assert sorted(p.name for p in eps[1].iterdir() if p.name != "optimizer.pt") == sorted(
        p.name for p in (tmp / "soup").iterdir() if p.name != "soup.json")


def test_uniform_soup_is_the_mean_and_frozen_tensors_are_shared(experts):
    eps, tmp = experts
    info = merge_checkpoints(eps, tmp / "soup")
    ts = [_all(e) for e in eps]
    soup = _all(tmp / "soup")
    for k, v in soup.items():
        if v.is_floating_point():
            assert torch.allclose(v, torch.stack([t[k] for t in ts]).mean(0), atol=1e-6), k
        else:
            assert torch.equal(v, ts[0][k])
    frozen = [k for k in soup if "vision_tower" in k]
    assert frozen and all(torch.equal(soup[k], ts[0][k]) for k in frozen)
    assert info["tensors_shared"] == 2  # frozen weight + integer buffer
    assert info["weights"] == pytest.approx([1 / 3] * 3)


def test_weighted_and_task_arithmetic(experts):
    eps, tmp = experts
    w = normalize_weights(2, "weighted", [3.0, 1.0])
    assert sum(w) == pytest.approx(1.0) and w == pytest.approx([0.75, 0.25])
    merge_checkpoints(eps[:2], tmp / "w", "weighted", [3.0, 1.0])
    a, b, s = _all(eps[0]), _all(eps[1]), _all(tmp / "w")
    k = next(k for k in s if "projector" in k)
    assert torch.allclose(s[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6)
    # task arithmetic with weights 1/n equals the uniform soup; with one expert and w=1 it is that expert
    base = eps[2]
    merge_checkpoints(eps[:2], tmp / "ta", "task_arithmetic", [0.5, 0.5], base=base)
    merge_checkpoints(eps[:2], tmp / "u", "uniform")
    ta, u = _all(tmp / "ta"), _all(tmp / "u")
    assert all(torch.allclose(ta[k], u[k], atol=1e-6) for k in u)
    merge_checkpoints(eps[:2], tmp / "ta2", "task_arithmetic", [1.0, 0.5], base=base)
    c, t2 = _all(base), _all(tmp / "ta2")
    assert torch.allclose(t2[k], c[k] + (a[k] - c[k]) + 0.5 * (b[k] - c[k]), atol=1e-5)
    with pytest.raises(ValueError):
        normalize_weights(2, "weighted", [0.0, 0.0])
    with pytest.raises(ValueError):
        merge_checkpoints(eps[:2], tmp / "x", "task_arithmetic", [0.5, 0.5])  # no base


def test_mismatched_experts_are_rejected(tmp_path):
    a = _ckpt(tmp_path, "a", 0, {"w": torch.zeros(2)})
    b = tmp_path / "b"
    b.mkdir()
    save_file({"other": torch.zeros(1)}, str(b / "projector.safetensors"))
    with pytest.raises(ValueError):
        merge_checkpoints([a, b], tmp_path / "soup")


def test_soup_store_merges_in_the_worker_and_logs_holds(experts):
    eps, tmp = experts
    store = SoupStore({"a": str(eps[0]), "b": str(eps[1]), "c": str(eps[2])}, local_dir=str(tmp))
    uri = soup_uri(["b", "a"])
    assert uri == "soup/a+b" and parse_soup_uri(uri) == (["a", "b"], None)
    local = store.fetch(uri)
    merged = _all(local)
    ref = _all(eps[0])
    k = next(k for k in merged if "projector" in k)
    assert torch.allclose(merged[k], (ref[k] + _all(eps[1])[k]) / 2, atol=1e-6)
    store.release(local)
    assert not os.path.exists(local)
    kinds = [r["kind"] for r in store.log.rows]
    assert kinds.count("expert") == 2 and kinds.count("soup") == 1
    assert peak_held(store.log.rows, "expert") == 1  # experts were merged one at a time
    assert parse_soup_uri("soup/a=0.7+b=0.3") == (["a", "b"], [0.7, 0.3])


def test_peak_held_sweep():
    rows = [{"kind": "soup", "t_start": 0, "t_end": 2}, {"kind": "soup", "t_start": 1, "t_end": 3},
            {"kind": "soup", "t_start": 2, "t_end": 4}, {"kind": "soup", "t_start": 2.5, "t_end": 2.7}]
    assert peak_held(rows) == 3
    assert peak_held(HoldLog().rows) == 0
