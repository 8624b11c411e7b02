"""core.io.publish: one copy of a task's output folder (plus named extra folders) to the user's output_dir."""

from __future__ import annotations

import os

from core.io.publish import display_root, publish


def test_publish_copies_tree_and_extras_and_moves_other_files_aside(tmp_path):
    out = tmp_path / "work" / "run_summary"
    (out / "decks").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "decks" / "ingest.html").write_text("<p>ingest</p>")
    export = tmp_path / "work" / "export"
    (export / "shards").mkdir(parents=True)
    (export / "shards" / "shard-000000.tar").write_bytes(b"tar")
    dest = tmp_path / "published" / "run"  # does not exist yet
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "keep.txt").write_text("earlier")
    where = publish(str(out), str(dest), {"export": str(export)})
    assert where == str(dest)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["_published.json", "decks/ingest.html", "export/shards/shard-000000.tar", "summary.json"]
    # a file no publish wrote is never deleted: the folder that held it is kept aside, beside dest
    aside = [p for p in dest.parent.iterdir() if p.name.startswith(".run.old-")]
    assert len(aside) == 1 and (aside[0] / "old" / "keep.txt").read_text() == "earlier"
    (out / "summary.json").write_text('{"again": 1}')  # publishing again overwrites
    publish(str(out) + "/", f"file://{dest}/")
    assert (dest / "summary.json").read_text() == '{"again": 1}'


def test_display_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert display_root("s3://bucket/run/") == "s3://bucket/run"
    assert display_root("rel/dir/") == os.path.join(str(tmp_path), "rel/dir")
    assert display_root(f"file://{tmp_path}/x") == f"{tmp_path}/x"
