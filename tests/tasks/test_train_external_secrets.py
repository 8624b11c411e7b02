"""train_external: secrets come from Flyte secrets, never from plain inputs, and nothing logged shows them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.train.external import (
    ExternalTrainerConfig,
    check_plain_env,
    parse_secret_spec,
    placeholder_values,
    run_external,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_s3cr3tT0kenValue"
EXTRA = "extra-private-bucket-name"

TRAINER = (
    "import json, os, sys\n"
    "out = sys.argv[1]\n"
    "print('args', sys.argv[2:], 'token', os.environ.get('HF_TOKEN'))\n"  # a chatty trainer echoes everything
    "os.makedirs(os.path.join(out, 'epoch-1'))\n"
    "json.dump({'token': os.environ.get('HF_TOKEN'), 'args': sys.argv[2:]}, open(os.path.join(out, 'seen.json'), 'w'))\n"
    "sys.exit(int(os.environ.get('EXIT', '0')))\n"
)


def test_secrets_and_extra_values_never_reach_the_log(tmp_path, caplog):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    cfg = ExternalTrainerConfig(image="x", command=f"{sys.executable} {script} {{ckpt_dir}} --bucket {{bucket}}",
                                extra={"bucket": EXTRA}, env={"MY_FLAG": "on"})
    vals = placeholder_values(cfg, str(tmp_path), str(tmp_path / "ck"))
    with caplog.at_level(logging.INFO, logger="core.train.external"):
        assert run_external(cfg, vals, secrets={"HF_TOKEN": SECRET}) == [str(tmp_path / "ck" / "epoch-1")]
    seen = json.loads((tmp_path / "ck" / "seen.json").read_text())
    assert seen == {"token": SECRET, "args": ["--bucket", EXTRA]}  # the trainer got the real values
    assert SECRET not in caplog.text and EXTRA not in caplog.text
    assert "--bucket '<extra:bucket>'" in caplog.text and "token ***" in caplog.text

    failing = ExternalTrainerConfig(image="x", command=cfg.command, extra=cfg.extra, env={"EXIT": "3"})
    with pytest.raises(subprocess.CalledProcessError) as e:
        run_external(failing, placeholder_values(failing, str(tmp_path), str(tmp_path / "ck2")), {"HF_TOKEN": SECRET})
    assert EXTRA not in str(e.value) and SECRET not in str(e.value)


@pytest.mark.parametrize("name", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "db_password", "GH_AUTH"])
def test_secret_looking_plain_env_is_refused(name):
    with pytest.raises(ValueError, match="looks like a secret"):
        check_plain_env({name: "x"})
    with pytest.raises(ValueError, match="looks like a secret"):
        run_external(ExternalTrainerConfig(image="x", command="true", env={name: "x"}), {"ckpt_dir": "/nonexistent"})


def test_plain_env_and_secret_spec():
    check_plain_env({"OMP_NUM_THREADS": "4", "MY_FLAG": "on"})
    with pytest.raises(ValueError, match="not an environment variable name"):
        check_plain_env({"A=B": "x"})
    assert parse_secret_spec("HF_TOKEN=hf/token, AWS_SECRET_ACCESS_KEY=aws/secret-key") == {
        "HF_TOKEN": ("hf", "token"), "AWS_SECRET_ACCESS_KEY": ("aws", "secret-key")}
    assert parse_secret_spec("") == {}
    for bad in ("HF_TOKEN", "HF_TOKEN=hf", "HF_TOKEN=/k", "1X=a/b"):
        with pytest.raises(ValueError, match="ENV_NAME=group/key"):
            parse_secret_spec(bad)


CHILD = """
import json, os, sys
from flytekit.types.directory import FlyteDirectory
import tasks.train as t
sc = t.train_external.security_context
out = {"secrets": [(s.group, s.key) for s in sc.secrets], "env": t.train_external.environment}
ck = t.train_external(data=FlyteDirectory(sys.argv[1]), command=sys.executable + " " + sys.argv[2] + " {ckpt_dir}")
out["seen"] = json.load(open(os.path.join(ck[0].path, "..", "seen.json")))
print(json.dumps(out))
"""


def test_task_declares_secret_requests_and_hands_the_secret_to_the_trainer(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    (tmp_path / "data").mkdir()
    env = {**os.environ, "MMCURATE_TRAIN_SECRETS": "HF_TOKEN=hf/token", "_FSEC_HF_TOKEN": SECRET,
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "data"), str(script)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["secrets"] == [["hf", "token"]]
    assert out["env"] == {"MMCURATE_TRAIN_SECRETS": "HF_TOKEN=hf/token"}
    assert out["seen"]["token"] == SECRET
    assert SECRET not in r.stderr
