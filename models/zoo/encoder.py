"""Build a preset's timm model, load its weights safely, and wrap it as an embedding module.

:func:`load_encoder` is the one entry point: a preset name, ``hf-hub:ORG/NAME`` or a local weights
file in, an :class:`Encoder` out (``encoder.model`` maps a *normalised* batch to the preset's
embedding; ``encoder.normalize`` does the normalisation; ``encoder.provenance`` is what a feature
file records). Weights are read only by :func:`models.backbones.load_state_dict` (safetensors or
``torch.load(weights_only=True)``) and timm is never given ``pretrained=True``, a checkpoint path or
a pretrained-config overlay: a ``config.json`` (hub cache or next to a local file) may set
architecture keys only (:func:`models.backbones.check_arch_kwargs`); anything else is refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import backbones
from ..backbones import WeightsError, load_state_dict, weights_sha256
from .convert import convert_state_dict, timm_kwargs_from_config
from .hub import HubFile, hub_file, snapshot_json
from .presets import LAYERS, PRESETS, Preset

_CREATE_OWN = ("num_classes", "img_size", "dynamic_img_size")


def resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn a preset's JSON kwargs into timm kwargs (layer names -> classes, ``norm_eps`` -> norm)."""
    out = dict(kwargs)
    for key in ("mlp_layer", "act_layer"):
        if key in out:
            name = out[key]
            if name not in LAYERS:
                raise ValueError(f"unknown layer {name!r} for {key}; known: {sorted(LAYERS)}")
            module, _, attr = LAYERS[name].rpartition(".")
            out[key] = getattr(importlib.import_module(module), attr)
    if "norm_eps" in out:
        out["norm_layer"] = partial(nn.LayerNorm, eps=float(out.pop("norm_eps")))
    return out


def build_trunk(preset: Preset, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The preset's timm model with random weights (``kwargs`` default to the preset's)."""
    kw = resolve_layers(preset.timm_kwargs if kwargs is None else kwargs)
    own = {k: kw.pop(k) for k in _CREATE_OWN if k in kw}
    return backbones.create(
        preset.arch,
        num_classes=own.get("num_classes", 0),
        img_size=own.get("img_size"),
        dynamic_img_size=own.get("dynamic_img_size", True),
        **kw,
    )


class PresetEmbedding(nn.Module):
    """``trunk`` followed by the preset's pooling rule; input is an already normalised batch."""

    def __init__(self, trunk: nn.Module, pooling: str):
        super().__init__()
        if pooling not in ("cls", "cls+mean", "layer3-avg"):
            raise ValueError(f"unknown pooling rule {pooling!r}")
        self.trunk = trunk
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "layer3-avg":
            t = self.trunk
            x = t.maxpool(t.act1(t.bn1(t.conv1(x))))
            x = t.layer3(t.layer2(t.layer1(x)))
            return x.mean(dim=(2, 3))
        tokens = self.trunk.forward_features(x)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        patches = tokens[:, int(self.trunk.num_prefix_tokens) :]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


@dataclass
class Encoder:
    """An embedding model with what feeding it (the preset's normalisation, input size, µm/px) and
    recording it (``provenance``: string attributes for a feature file) needs."""

    model: PresetEmbedding
    preset: Preset
    provenance: dict[str, str]

    @property
    def dim(self) -> int:
        return self.preset.dim

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preset.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preset.std

    @property
    def input_size(self) -> int:
        return self.preset.input_size

    @property
    def mpp(self) -> float | None:
        return self.preset.mpp

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 (0..255) or float (0..1) RGB -> the model's normalised float input."""
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(batch))


def get_preset(name: str) -> Preset:
    """A preset by name (case-insensitive) or by its hub id."""
    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    for p in PRESETS.values():
        if p.hub_id.lower() == key:
            return p
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} (see `slidestream models`)")


def _timm_hub_config(preset: Preset, cfg: dict[str, Any] | None, source: str) -> dict[str, Any]:
    kwargs = dict(preset.timm_kwargs)
    if not cfg:
        return kwargs
    arch = cfg.get("architecture")
    if arch and arch != preset.arch:
        raise WeightsError(
            f"{source}: config.json names architecture {arch!r} but preset {preset.name!r} is "
            f"{preset.arch!r}; use the matching preset or a plain timm name"
        )
    # a config.json is a file like any other: architecture keys only, plain values, or a refusal
    cfg_source = f"{Path(source).with_name('config.json')} (the config.json of {source})"
    for k, v in backbones.check_arch_kwargs(cfg.get("model_args") or {}, cfg_source).items():
        if k not in ("mlp_layer", "act_layer"):  # layers are the preset's (named in LAYERS), not the file's
            kwargs[k] = v
    return kwargs


def _hf_config(preset: Preset, cfg: dict[str, Any] | None, source: str) -> dict[str, Any]:
    if not cfg:
        raise WeightsError(f"{source}: a transformers checkpoint needs its config.json next to it")
    derived = timm_kwargs_from_config(cfg, preset.layout)
    expected_dim = preset.dim // (2 if preset.pooling == "cls+mean" else 1)
    if derived["embed_dim"] != expected_dim:
        raise WeightsError(
            f"{source}: config.json has hidden_size {derived['embed_dim']} but preset {preset.name!r} "
            f"expects {expected_dim}; use the matching preset"
        )
    if derived.get("reg_tokens", 0) != preset.reg_tokens:
        raise WeightsError(
            f"{source}: config.json has {derived.get('reg_tokens', 0)} register tokens, preset "
            f"{preset.name!r} expects {preset.reg_tokens}"
        )
    own = {k: preset.timm_kwargs[k] for k in ("num_classes", "dynamic_img_size") if k in preset.timm_kwargs}
    return {**derived, **own}


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if "pos_embed" in bad:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        side = int(round((own["pos_embed"].shape[1] - prefix) ** 0.5))
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [side, side], num_prefix_tokens=prefix)
        bad.remove("pos_embed")
    if bad:
        detail = ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:4])
        raise WeightsError(f"{source}: tensor shapes do not match the preset's architecture ({detail})")
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{source}: weights do not match the preset's architecture: missing {result.missing_keys[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}"
        )


def load_encoder(
    spec: str | Preset,
    *,
    weights: str | Path | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
) -> Encoder:
    """Load a preset (name, hub id, ``hf-hub:ORG/NAME`` or a :class:`Preset`) as an :class:`Encoder`.

    Without ``weights`` the preset's files are taken from the Hugging Face cache (downloaded into it
    when online and allowed; see :func:`models.zoo.hub.hub_file`). With ``weights`` (a local
    ``.safetensors``, or ``.bin``/``.pth`` read with ``weights_only=True``; for transformers presets
    the ``config.json`` must sit next to it) the hub is not consulted. Loading is strict: every
    tensor of the architecture must come from the file."""
    preset = spec if isinstance(spec, Preset) else get_preset(spec.removeprefix("hf-hub:"))
    hub: HubFile | None = None
    if weights is None:
        hub = hub_file(preset.hub_id, preset.files, revision=revision, cache_dir=cache_dir, offline=offline)
        path = hub.path
        cfg = snapshot_json(hub, "config.json", offline=offline)
    else:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"weights file not found: {path}")
        side = path.with_name("config.json")
        cfg = json.loads(side.read_text()) if side.exists() else None
    source = str(path)
    if preset.layout == "timm":
        kwargs = _timm_hub_config(preset, cfg, source)
    else:
        kwargs = _hf_config(preset, cfg, source)
    trunk = build_trunk(preset, kwargs)
    sd, _ = load_state_dict(path)
    if preset.layout != "timm":
        sd = convert_state_dict(sd, preset.layout, reg_tokens=preset.reg_tokens)
    _load_into(trunk, sd, source)
    model = PresetEmbedding(trunk, preset.pooling).eval()
    provenance = {
        "encoder_preset": preset.name,
        "encoder_hub_id": preset.hub_id if hub else "",
        "encoder_hub_revision": hub.revision if hub else "",
        "encoder_weights_file": hub.filename if hub else str(path),
        "encoder_weights_sha256": weights_sha256(path),
        "encoder_arch": preset.arch,
        "encoder_timm_kwargs": json.dumps(kwargs, sort_keys=True),
        "encoder_pooling": preset.pooling,
        "encoder_dim": str(preset.dim),
        "encoder_mean": json.dumps(list(preset.mean)),
        "encoder_std": json.dumps(list(preset.std)),
    }
    return Encoder(model=model, preset=preset, provenance=provenance)


def with_kwargs(preset: Preset, **overrides: Any) -> Preset:
    """A copy of ``preset`` with some timm keyword arguments replaced (e.g. a shallower test model)."""
    return dataclasses.replace(preset, timm_kwargs={**preset.timm_kwargs, **overrides})
