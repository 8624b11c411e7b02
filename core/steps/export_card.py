"""The export's dataset card: `README.md` in the Hugging Face Hub's form, written from the manifest alone.

The YAML header declares one `datasets` config per sample kind (`shards/<kind>/*.tar`, homogeneous, so
`load_dataset("webdataset", data_files=...)` and the Hub's viewer read each kind), then the body says what
the data is, where it came from, what each step removed and why, with which export config and code version.
The licence is left for the user (`license: unknown` until they set it): curation does not change it.

Every data-derived string goes through `_yaml` (a JSON string is a valid YAML scalar) or `_md` (Markdown
table cells: pipes, backticks and HTML escaped), so a crafted subset name or reason cannot break the card.
"""

from __future__ import annotations

import html
import json
from typing import Any

KIND_DESCRIPTIONS = {"text": "text-only samples (no image)", "image": "single-image samples"}


def kind_description(kind: str) -> str:
    """Human words for a shard kind (`text`, `image`, `images<n>`, with `-<ext>` for image_format=keep)."""
    base, _, ext = kind.partition("-")
    if base in KIND_DESCRIPTIONS:
        words = KIND_DESCRIPTIONS[base]
    elif base.startswith("images") and base[6:].isdigit():
        words = f"samples with {int(base[6:])} images"
    else:
        words = "samples"
    return f"{words} ({ext.replace('-', ', ')} images)" if ext else words


def _yaml(s: Any) -> str:
    return json.dumps(s, ensure_ascii=False)


def _md(s: Any) -> str:
    return html.escape(str(s)).replace("|", "\\|").replace("`", "\\`").replace("\n", " ")


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < bound:
            return name
    return "100M<n<1B"


def dataset_card(manifest: dict[str, Any], code_version: str = "", source: str = "") -> str:
    """The Hub dataset card (YAML header + Markdown provenance) of an export, from its manifest."""
    kinds = manifest.get("kinds", {})
    head = ["---", "license: unknown", "task_categories:", "- visual-question-answering", "- image-text-to-text",
            "tags:", "- mmcurate", "- webdataset", "size_categories:", f"- {_size_category(manifest['n_samples'])}",
            "configs:"]
    for i, kind in enumerate(sorted(kinds)):
        head += [f"- config_name: {_yaml(kind)}"] + (["  default: true"] if i == 0 else []) + [
            "  data_files:", "  - split: train", f"    path: {_yaml(f'shards/{kind}/*.tar')}"]
    head.append("---")

    title = manifest.get("subset") or "curated"
    body = [
        "", f"# mmcurate export: {_md(title)}", "",
        f"{manifest['n_samples']} samples in {manifest['n_shards']} WebDataset shards "
        f"({manifest['n_bytes'] / 1e6:.1f} MB), LLaVA conversation format (`key.json`) with images as "
        "`key.<ext>` (one image) or `key.<i>.<ext>` (several). Shards are homogeneous by sample kind, one "
        "`datasets` config each:", "",
        "| config | what | samples | shards |", "|---|---|---:|---:|",
    ]
    for kind in sorted(kinds):
        k = kinds[kind]
        body.append(f"| `{_md(kind)}` | {kind_description(kind)} | {k['n_samples']} | {k['n_shards']} |")
    body += ["", "```python", "from datasets import load_dataset",
             f"ds = load_dataset(\"webdataset\", data_files={{\"train\": \"shards/{sorted(kinds)[0] if kinds else 'image'}"
             "/*.tar\"}, split=\"train\")",
             "import webdataset as wds  # or every kind at once, in the manifest's shard order",
             "```", "", "## Provenance", ""]
    if source:
        body.append(f"- source: `{_md(source)}`")
    body += [f"- selection: `{_md(manifest.get('selection', ''))}`",
             f"- steps (in order): {', '.join(f'`{_md(s)}`' for s in manifest.get('steps', []))}",
             f"- code version: `{_md(code_version or 'unknown')}`",
             "- licence: not set by the curation; the source dataset's licence applies (edit `license:` above)",
             "", "### What each step removed", "",
             "| step | inputs | kept | modified | removed | top reasons |", "|---|---:|---:|---:|---:|---|"]
    for r in manifest.get("removed_by_step", []):
        top = sorted(r.get("by_reason", []), key=lambda x: -x["count"])[:5]
        reasons = "; ".join(f"{_md(x['decision'])} `{_md(x['reason'])}` {x['count']}" for x in top) or "-"
        body.append(f"| `{_md(r['step'])}` | {r['inputs']} | {r['kept']} | {r['modified']} | {r['removed']} "
                    f"| {reasons} |")
    body += ["", "### Export config", "", "```json",
             # a backtick run in a config value must not close the fence: \u0060 is the same JSON string
             json.dumps(manifest.get("config", {}), indent=1, sort_keys=True).replace("`", "\\u0060"), "```",
             "", "`manifest.json` beside this card lists every shard with its sample ids, size and sha256.", ""]
    return "\n".join(head + body)
