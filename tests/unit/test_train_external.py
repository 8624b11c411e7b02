"""External trainer: command template rendering, quoting, placeholders, running and checkpoint discovery."""

from __future__ import annotations

import subprocess
import sys

import pytest

from core.train.external import ExternalTrainerConfig, placeholder_values, render_command, run_external


def test_render_keeps_each_value_one_argument():
    cfg = ExternalTrainerConfig(
        image="ghcr.io/team/trainer:1",
        command="torchrun --nnodes {nnodes} --nproc_per_node={nproc} train.py --data '{data_dir}' "
                "--out {ckpt_dir} --lr {lr} --tag run-{run_name} --json '{{\"a\": 1}}'",
        extra={"run_name": "abl 3"},
    )
    vals = placeholder_values(cfg, "/data/my shards; rm -rf /", "/ck/$HOME", nnodes=2, nproc_per_node=8, lr=2e-5)
    argv = render_command(cfg.command, vals)
    assert argv == ["torchrun", "--nnodes", "2", "--nproc_per_node=8", "train.py", "--data",
                    "/data/my shards; rm -rf /", "--out", "/ck/$HOME", "--lr", "2e-05", "--tag", "run-abl 3",
                    "--json", '{"a": 1}']


def test_unknown_placeholder_is_an_error():
    with pytest.raises(KeyError, match="data_path"):
        render_command("train --data {data_path}", {"data_dir": "/d"})


def test_run_external_returns_checkpoints_and_fails_loudly(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(
        "import os, sys\n"
        "out, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "assert os.path.isdir(data), data\n"
        "for e in range(n):\n"
        "    os.makedirs(os.path.join(out, f'epoch-{e + 1}'))\n"
        "print('trained', os.environ['MY_FLAG'])\n"
    )
    (tmp_path / "data dir").mkdir()
    cfg = ExternalTrainerConfig(image="x", command=f"{sys.executable} {script} {{ckpt_dir}} {{data_dir}} {{epochs}}",
                                env={"MY_FLAG": "on"}, checkpoint_glob="epoch-*")
    vals = placeholder_values(cfg, str(tmp_path / "data dir"), str(tmp_path / "ck pts"), epochs=3)
    assert run_external(cfg, vals) == [str(tmp_path / "ck pts" / f"epoch-{e}") for e in (1, 2, 3)]
    bad = ExternalTrainerConfig(image="x", command=f"{sys.executable} -c 'import sys; sys.exit(3)' {{ckpt_dir}}")
    with pytest.raises(subprocess.CalledProcessError):
        run_external(bad, placeholder_values(bad, "/d", str(tmp_path / "c2")))
