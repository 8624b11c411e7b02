"""core/foundation/fingerprint.py: cheap identities of run-time inputs for resume checks."""

from __future__ import annotations

import os

from core.foundation.fingerprint import dir_fingerprint


def test_empty_and_non_path_values_are_their_own_identity(tmp_path, monkeypatch):
    # "" (an unset vision_pretrained / init_from) must never fingerprint the working directory: Path("") is "."
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "a.bin").write_bytes(b"x" * 10)
    monkeypatch.chdir(tmp_path)
    assert dir_fingerprint("") == ""
    assert dir_fingerprint("local-dir:") == "local-dir:"
    assert dir_fingerprint(None) == ""
    assert dir_fingerprint("hf-hub:timm/some-model") == "hf-hub:timm/some-model"


def test_a_directory_is_identified_by_names_sizes_and_small_contents(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "config.json").write_text('{"dim": 8}')
        (d / "sub" / "w.bin").write_bytes(b"\0" * 64)
    assert dir_fingerprint(a) == dir_fingerprint(b) != dir_fingerprint(a / "config.json")  # the path is no identity
    (b / "config.json").write_text('{"dim": 9}')
    assert dir_fingerprint(a) != dir_fingerprint(b)
    os.remove(b / "sub" / "w.bin")
    assert dir_fingerprint(b).startswith("sha256:")
