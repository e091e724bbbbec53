"""Backbones: any timm model by name, with safe weight loading.

``create(name, weights=FILE)`` builds ``timm.create_model(name, pretrained=False, num_classes=0)``
and loads a user's weights from a ``.safetensors`` file or a ``torch.load(weights_only=True)``
checkpoint. Nothing is ever unpickled and nothing is downloaded: ``pretrained=True`` raises and
tells the user to pass ``weights=FILE`` instead.

Checkpoint layouts handled: a flat state dict; nested under ``teacher`` / ``model`` /
``state_dict`` / ``module`` / ``student`` (the first one present, in that order); keys prefixed by
``module.``, ``_orig_mod.``, ``backbone.``, ``teacher.``, ``student.``, ``encoder.`` (stripped,
repeatedly). A ViT position embedding stored for another image size is resampled (bicubic).
Missing and unexpected keys are logged and kept on ``model.load_report``; ``strict=True`` turns
them into an error.

``save_backbone(model, path, metadata)`` writes safetensors with the timm architecture name and
image size in the file's metadata (and a ``.json`` sidecar), so ``create(None, weights=path)``
rebuilds the same model without being told its name.

Weights never execute code. What a file says about its architecture — a weights file's metadata, its
JSON sidecar, a checkpoint's model config, a hub ``config.json`` — may only set the keys of
:data:`ARCH_KEYS` (sizes, depths, pooling, token layout, ...), with plain values (numbers, booleans,
short names, lists of numbers); the architecture name must be a plain timm name.
``checkpoint_path``, ``pretrained*``, ``pretrained_cfg*``, ``cache_dir``, any file path or URL and
every other key are refused (:func:`check_arch_kwargs`, :class:`WeightsError` naming the file and the
key): timm would otherwise ``torch.load`` whatever file they name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

# re-exported: the weights checks live in a module without timm (the tissue U-Net uses them)
from .weights_check import ARCH_KEYS, WeightsError, check_arch_kwargs, check_arch_name  # noqa: F401

log = logging.getLogger(__name__)

#: nested checkpoint entries searched for a state dict, in this order
NESTED_KEYS = ("teacher", "model", "state_dict", "module", "student")
#: key prefixes stripped from checkpoint keys
PREFIXES = ("module.", "_orig_mod.", "backbone.", "teacher.", "student.", "encoder.")
#: keys whose metadata entries ``save_backbone`` always writes
META_ARCH = "timm_name"


@dataclass
class LoadReport:
    """What happened when weights were loaded into a model."""

    source: str
    sha256: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


def weights_sha256(path: str | Path) -> str:
    """sha256 hex digest of a weights file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a safetensors file (empty for other formats), merged with its JSON sidecar."""
    path = Path(path)
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta.update(f.metadata() or {})
        except Exception as e:  # noqa: BLE001 - safetensors' errors (a pickle, a damaged header) are not OSErrors
            raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            extra = json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{sidecar}: not valid JSON ({e}); delete or fix the sidecar") from None
        for k, v in extra.items():
            meta.setdefault(k, v if isinstance(v, str) else json.dumps(v))
    return meta


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict safely: safetensors, or ``torch.load(weights_only=True)``.

    Returns ``(state_dict, metadata)`` with nested entries resolved and prefixes stripped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors' errors (a pickle, a damaged header) are not OSErrors
            raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal or corrupt file
            raise WeightsError(
                f"{path}: cannot be read as a safe torch checkpoint ({type(e).__name__}: {e}); "
                "slidestream only loads safetensors or tensor-only checkpoints "
                "(torch.load weights_only=True) — convert it with save_backbone or safetensors"
            ) from None
    for _ in range(4):
        if not isinstance(sd, dict):
            break
        nested = next((k for k in NESTED_KEYS if isinstance(sd.get(k), dict)), None)
        if nested is None:
            break
        sd = sd[nested]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: no state dict of tensors found (looked under {list(NESTED_KEYS)})")
    return {strip_prefixes(k): v for k, v in sd.items()}, read_metadata(path)


def strip_prefixes(key: str, prefixes: tuple[str, ...] = PREFIXES) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
                changed = True
    return key


def _resize_pos_embed(model: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict().get("pos_embed")
    theirs = sd.get("pos_embed")
    if own is None or theirs is None or own.shape == theirs.shape:
        return []
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n_own = own.shape[1] - prefix
    side = int(round(n_own**0.5))
    sd["pos_embed"] = resample_abs_pos_embed(theirs, [side, side], num_prefix_tokens=prefix)
    return ["pos_embed"]


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = False) -> LoadReport:
    """Load ``path`` into ``model``; report (and log) missing / unexpected keys."""
    sd, meta = load_state_dict(path)
    resized = _resize_pos_embed(model, sd)
    own = model.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        detail = ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:5])
        raise WeightsError(
            f"{path}: tensor shapes do not match the model ({detail}); check the architecture name"
        )
    result = model.load_state_dict(sd, strict=False)
    report = LoadReport(
        source=str(path),
        sha256=weights_sha256(path),
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
        resized=resized,
        metadata=meta,
    )
    if report.missing or report.unexpected:
        msg = (
            f"{path}: {len(report.missing)} missing key(s) {report.missing[:8]}, "
            f"{len(report.unexpected)} unexpected key(s) {report.unexpected[:8]}"
        )
        if strict:
            raise WeightsError(msg + "; pass strict=False to load anyway")
        log.warning(msg)
    return report


def _timm_create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` that drops options an architecture does not take (sizes for CNNs,
    ``zero_init_last`` for ViTs)."""
    optional = ("dynamic_img_size", "img_size", "zero_init_last")
    kwargs = dict(kwargs)
    while True:
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as e:
            bad = next((k for k in optional if k in kwargs and f"'{k}'" in str(e)), None)
            if bad is None:
                raise
            kwargs.pop(bad)


def create(
    name: str | None,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int = 0,
    img_size: int | None = None,
    dynamic_img_size: bool = True,
    strict: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """A timm backbone by name, optionally initialised from a local weights file.

    ``name`` None or ``"auto"`` reads the architecture, image size and extra timm keyword arguments
    (``timm_kwargs``, e.g. ``{"patch_size": 8}``) from the weights' metadata (written by
    :func:`save_backbone`); only architecture keys are accepted from there (:func:`check_arch_kwargs`). ``img_size`` and ``dynamic_img_size`` apply to
    architectures that take them (ViTs; ignored by CNNs): with dynamic size a ViT accepts crops of
    any multiple of its patch size, as DINO's local crops need. Other keyword arguments go to
    ``timm.create_model`` (``drop_path_rate``, ``zero_init_last``, ...). The model gets
    ``model.load_report`` (a :class:`LoadReport`, or None without weights)."""
    if pretrained:
        raise WeightsError(
            "pretrained=True would download weights, which slidestream never does; "
            "pass weights=FILE (.safetensors or a tensor-only torch checkpoint) instead"
        )
    meta: dict[str, str] = {}
    if weights is not None:
        if not Path(weights).exists():
            raise FileNotFoundError(f"weights file not found: {weights}")
        meta = read_metadata(weights)
    if name in (None, "", "auto"):
        if META_ARCH not in meta:
            raise WeightsError(
                f"{weights}: no architecture name in the weights' metadata; pass the timm model name "
                "explicitly (e.g. create('vit_small_patch16_224', weights=...))"
            )
        name = check_arch_name(meta[META_ARCH], weights)
        if img_size is None and "img_size" in meta:
            img_size = check_arch_kwargs({"img_size": _json(meta["img_size"], weights)}, weights)["img_size"]
            if not isinstance(img_size, int) or isinstance(img_size, bool):
                raise WeightsError(f"{weights}: img_size {img_size!r} in the metadata is not an integer")
        if "timm_kwargs" in meta:
            kwargs = {**check_arch_kwargs(_json(meta["timm_kwargs"], weights), weights), **kwargs}
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}; see timm.list_models() for valid names")
    options = dict(kwargs, num_classes=num_classes)
    if dynamic_img_size:
        options["dynamic_img_size"] = True
    if img_size is not None:
        options["img_size"] = img_size
    model = _timm_create(name, options)
    model.load_report = load_weights(model, weights, strict=strict) if weights is not None else None
    return model


def _json(value: Any, source: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise WeightsError(f"{source}: metadata value {value[:80]!r} is not valid JSON") from None


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features a backbone with ``num_classes=0`` returns."""
    for attr in ("num_features", "embed_dim"):
        dim = getattr(model, attr, None)
        if isinstance(dim, int):
            return dim
    raise ValueError(f"cannot tell the feature width of {type(model).__name__}; it has no num_features")


def architecture(model: nn.Module) -> str | None:
    """The timm name a model was created with (from its pretrained config), if known."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def image_size(model: nn.Module) -> int | None:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        return None
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def save_backbone(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict as safetensors (atomically) plus a ``.json`` sidecar.

    The metadata always holds the timm name (``timm_name``), feature width and image size; pass
    ``timm_kwargs`` (a dict) in ``metadata`` when the model was built with extra timm options."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: backbone weights are written as .safetensors; use that suffix")
    meta: dict[str, Any] = {"feature_dim": feature_dim(model)}
    arch = architecture(model)
    if arch:
        meta[META_ARCH] = arch
    size = image_size(model)
    if size:
        meta["img_size"] = size
    meta.update(metadata or {})
    str_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(sd, str(tmp), metadata=str_meta)
    tmp.replace(path)
    sidecar_tmp = path.with_name(f".{path.stem}.json.tmp")
    sidecar_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    sidecar_tmp.replace(path.with_suffix(".json"))
    return path
