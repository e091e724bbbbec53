"""Hugging Face hub caches laid out exactly as huggingface_hub lays them out, for offline tests.

models--ORG--NAME/refs/main                       -> the commit hash
models--ORG--NAME/snapshots/<commit>/<file>       -> symlink ../../blobs/<sha256>
models--ORG--NAME/blobs/<sha256>                  -> the bytes
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Put ``files`` (name -> bytes) into ``cache`` as snapshot ``commit`` of ``repo_id`` at ``main``;
    returns the snapshot folder."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def safetensors_bytes(sd: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in sd.items()}, metadata=metadata)


def json_bytes(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def cache_shallow_preset(cache: Path, name: str = "kaiko-vits16", depth: int = 4) -> tuple[dict, str]:
    """Random weights of timm-layout preset ``name`` cut to ``depth`` blocks (the hub snapshot's
    config.json says so, as timm's hub configs do), saved into ``cache`` as huggingface_hub lays
    it out. Returns the state dict and the sha256 of the weights file."""
    import torch

    from models.zoo import PRESETS, build_trunk, with_kwargs

    preset = PRESETS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sd = build_trunk(with_kwargs(preset, depth=depth)).state_dict()
    data = safetensors_bytes(sd)
    config = {"architecture": preset.arch, "num_classes": 0, "model_args": {"depth": depth}}
    add_to_hub_cache(cache, preset.hub_id, {"model.safetensors": data, "config.json": json_bytes(config)})
    return sd, hashlib.sha256(data).hexdigest()


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """Offline mode on ``cache``: the environment variables for child processes, and
    huggingface_hub's constants for this one (it reads the variables once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
