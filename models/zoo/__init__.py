"""Pathology foundation-model presets (UNI, Virchow, H-optimus, Phikon, kaiko.ai, ...).

One table (:data:`PRESETS`, in :mod:`models.zoo.presets`) states for each public encoder the timm
architecture and keyword arguments, the hub id, normalisation, native input size and µm/px, the
embedding rule, output width, licence and the sources those come from. :func:`load_encoder` turns a
preset name, ``hf-hub:ORG/NAME`` or a local weights file into an :class:`Encoder` through
huggingface_hub's cache, honouring offline mode; :func:`model_rows` is the table
``slidestream models`` prints.

    enc = load_encoder("uni")               # or "hf-hub:MahmoodLab/UNI", or weights="uni.bin"
    feats = enc(tiles_uint8)                 # (B, 3, 224, 224) uint8 -> (B, 1024)
    enc.provenance                           # preset, hub revision, weights sha256 for the h5 file
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .encoder import (
    Encoder,
    PresetEmbedding,
    PresetWeights,
    build_trunk,
    get_preset,
    load_encoder,
    load_into,
    preset_weights,
    resolve_layers,
    with_kwargs,
)
from .hub import HubFile, HubWeightsError, cached_file, hub_file
from .presets import PRESETS, Preset


def model_rows(*, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per preset for ``slidestream models [--json]``: name, title, hub id, dim, input
    size, µm/px, pooling, licence, gating, whether weights are in the local hub cache (no network),
    sources and unconfirmed facts."""
    rows = []
    for p in PRESETS.values():
        local = cached_file(p.hub_id, p.files, cache_dir=cache_dir)
        rows.append(
            {
                "preset": p.name,
                "title": p.title,
                "hub_id": p.hub_id,
                "arch": p.arch,
                "dim": p.dim,
                "input_size": p.input_size,
                "mpp": p.mpp,
                "pooling": p.pooling,
                "licence": p.licence,
                "gated": p.gated,
                "present": local is not None,
                "path": str(local) if local else "",
                "source": p.source,
                "unconfirmed": p.unconfirmed,
            }
        )
    return rows


__all__ = [
    "PRESETS",
    "Encoder",
    "HubFile",
    "HubWeightsError",
    "Preset",
    "PresetEmbedding",
    "PresetWeights",
    "build_trunk",
    "cached_file",
    "get_preset",
    "hub_file",
    "load_encoder",
    "load_into",
    "model_rows",
    "preset_weights",
    "resolve_layers",
    "with_kwargs",
]
