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
