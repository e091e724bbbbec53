"""The fine-tuned model on disk, and building the model of a run.

A run writes two safetensors files (each atomically):

- ``encoder.safetensors``: the encoder alone, by :func:`models.backbones.save_backbone`, with the
  normalisation and input size it was trained with — what ``slidestream embed --encoder`` and
  :func:`models.encoders.load_encoder` read;
- ``head.safetensors``: the linear heads (``heads.<task>.weight``/``bias``), with the tasks, their
  class names and the encoder file's name in the metadata.

:func:`load_classifier` reads both back (a run's folder or its ``head.safetensors``): a teacher
for KD and Tf-KD-self, or a model to predict with. Nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import backbones
from models.encoders import META_INPUT, META_MEAN, META_STD, load_encoder, parse_encoder
from models.finetune import Classifier, set_trainable, zero_init_residual

from ..errors import ConfigError, MissingInputError
from .config import FinetuneConfig

ENCODER_FILE, HEAD_FILE = "encoder.safetensors", "head.safetensors"


@dataclass
class BuiltModel:
    """A classifier with what its inputs need: ``mean``/``std`` (normalisation), the timm
    architecture ``arch``, the encoder label, the names of zero-initialised and trainable
    encoder parameters, and weights-file metadata worth carrying to the export."""

    model: Classifier
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch: str
    label: str
    zeroed: list[str]
    trainable: list[str]
    carry: dict[str, Any]


def build_model(cfg: FinetuneConfig, n_classes: list[int], seed: int) -> BuiltModel:
    """The encoder of ``cfg.model.encoder`` (:func:`models.encoders.load_encoder`; random init
    from ``seed`` when it has no weights, then zero-γ when ``model.zero_init``), one linear head
    per task, a projection head for SupCon; parameters frozen as ``model.mode`` says."""
    m = cfg.model
    spec = parse_encoder(m.encoder)
    kwargs: dict[str, Any] = {"zero_init_last": bool(m.zero_init and spec.weights is None)}
    if m.drop_path_rate > 0:
        kwargs["drop_path_rate"] = m.drop_path_rate
    enc = load_encoder(spec, "cpu", seed=seed, **kwargs)
    zeroed = zero_init_residual(enc.model) if m.zero_init and spec.weights is None else []
    proj = cfg.loss.supcon.proj_dim if cfg.loss.name == "supcon" else None
    model = Classifier(enc.model.train(), enc.dim, n_classes, head_dropout=m.head_dropout, proj_dim=proj)
    try:
        trainable = set_trainable(model, m.mode, m.last_n)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    carry: dict[str, Any] = {}
    if spec.weights is not None:
        meta = backbones.read_metadata(spec.weights)
        carry = {k: json.loads(meta[k]) for k in ("timm_kwargs", "img_size") if k in meta}
    arch = backbones.architecture(enc.model) or enc.name
    return BuiltModel(model, enc.mean, enc.std, arch, enc.label, zeroed, trainable, carry)


def save_classifier(
    built: BuiltModel,
    out: str | Path,
    *,
    tasks: list[str],
    classes: list[list[str]],
    tile_size: int,
    **meta: Any,
) -> tuple[Path, Path]:
    """Write ``encoder.safetensors`` and ``head.safetensors`` to ``out`` (see the module
    docstring); returns both paths."""
    from safetensors.torch import save_file

    from wsi.atomic import atomic_path

    out = Path(out)
    model = built.model
    enc_meta = {
        **built.carry,
        META_MEAN: list(built.mean),
        META_STD: list(built.std),
        META_INPUT: int(tile_size),
        "source": "slidestream finetune",
        **meta,
    }
    enc_path = backbones.save_backbone(model.encoder, out / ENCODER_FILE, enc_meta)
    heads = {
        f"heads.{t}.{k}": v.detach().cpu().contiguous()
        for t, h in zip(tasks, model.heads)
        for k, v in h.state_dict().items()
    }
    head_meta = {
        "tasks": json.dumps(tasks),
        "classes": json.dumps(classes),
        "encoder": ENCODER_FILE,
        "feature_dim": str(model.dim),
        "timm_name": built.arch,
    }
    head_path = out / HEAD_FILE
    with atomic_path(head_path) as tmp:
        save_file(heads, str(tmp), metadata=head_meta)
    return enc_path, head_path


@dataclass
class LoadedClassifier:
    """A classifier read by :func:`load_classifier`, in eval mode."""

    model: Classifier
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tasks: list[str]
    classes: list[list[str]]
    arch: str
    source: str


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> LoadedClassifier:
    """The classifier a ``slidestream finetune`` run wrote: its folder, or its ``head.safetensors``
    (the encoder file named in the head's metadata lies next to it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    head = p / HEAD_FILE if p.is_dir() else p
    if not head.is_file():
        raise MissingInputError(
            f"{head} not found; a teacher is the output folder (or its {HEAD_FILE}) of `slidestream "
            f"finetune` — train it first, e.g. slidestream finetune --config pipelines/configs/finetune/ce.yaml"
        )
    with safe_open(str(head), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(head))
    tasks, classes = json.loads(meta["tasks"]), json.loads(meta["classes"])
    enc = load_encoder(str(head.parent / meta.get("encoder", ENCODER_FILE)), device)
    model = Classifier(enc.model, enc.dim, [len(c) for c in classes])
    for t, h in zip(tasks, model.heads):
        h.load_state_dict({k: tensors[f"heads.{t}.{k}"] for k in ("weight", "bias")})
    model = model.to(device).eval()
    arch = meta.get("timm_name") or backbones.architecture(enc.model) or enc.name
    return LoadedClassifier(model, enc.mean, enc.std, tasks, classes, arch, str(head.parent))
