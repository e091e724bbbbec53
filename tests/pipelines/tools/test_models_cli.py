"""`slidestream models [--json]`: the preset table, with whether weights are in the local hub cache."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

from zoo_helpers import cache_shallow_preset, use_hub_cache

from models.zoo import PRESETS
from pipelines.cli import main


def _run(*argv: str) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", *argv]) == 0
    return buf.getvalue()


def test_models_lists_every_preset_and_what_is_cached(tmp_path, monkeypatch):
    cache_shallow_preset(tmp_path, "kaiko-vits16", depth=1)
    rows = json.loads(_run("--json", "--cache-dir", str(tmp_path)))
    assert [r["preset"] for r in rows] == list(PRESETS)
    by = {r["preset"]: r for r in rows}
    assert by["kaiko-vits16"]["present"] and by["kaiko-vits16"]["path"].startswith(str(tmp_path))
    assert not by["uni"]["present"] and by["uni"]["gated"] and by["uni"]["dim"] == 1024
    assert {"arch", "mpp", "licence", "hub_id", "source"} <= set(by["uni"])
    # the text table, looking in the cache huggingface_hub is pointed at (HF_HUB_CACHE)
    use_hub_cache(monkeypatch, tmp_path)
    text = _run().splitlines()
    assert text[0].split() == [
        "preset",
        "architecture",
        "dim",
        "µm/px",
        "licence",
        "gated",
        "hub",
        "id",
        "local",
    ]
    kaiko = next(line for line in text if line.startswith("kaiko-vits16 "))
    assert kaiko.split()[-1] == "yes" and "vit_small_patch16_224" in kaiko and " 384 " in kaiko
    assert next(line for line in text if line.startswith("uni ")).split()[-1] == "no"
    assert text[-1].startswith(f"1 of {len(PRESETS)} presets have weights in the local cache")
