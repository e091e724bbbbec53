"""Hugging Face ``transformers`` ViT / DINOv2 checkpoints as timm ``VisionTransformer`` state dicts.

Phikon (``ViTModel``), Phikon-v2 and Midnight (``Dinov2Model``) and Hibou (``Dinov2ModelWithRegisters``,
remote code) are published as ``transformers`` checkpoints. slidestream builds the equivalent timm
ViT instead of running ``transformers``: the checkpoint's ``config.json`` gives the timm keyword
arguments (:func:`timm_kwargs_from_config`) and :func:`convert_state_dict` renames the tensors.

Key conversion (``L`` = layer index; ``encoder.`` may already be stripped by the safe loader):

======================================================  =======================================
transformers (hub file layout)                           timm
======================================================  =======================================
embeddings.cls_token                                     cls_token (+ position 0, with registers)
embeddings.register_tokens                               reg_token
embeddings.position_embeddings                           pos_embed (without position 0, with registers)
embeddings.patch_embeddings.projection.{weight,bias}     patch_embed.proj.{weight,bias}
embeddings.mask_token, pooler.*                          dropped (unused at inference)
encoder.layer.L.attention.attention.{query,key,value}    blocks.L.attn.qkv (concatenated q, k, v)
encoder.layer.L.attention.output.dense                   blocks.L.attn.proj
ViT: layernorm_before / layernorm_after                  blocks.L.norm1 / blocks.L.norm2
ViT: intermediate.dense / output.dense                   blocks.L.mlp.fc1 / blocks.L.mlp.fc2
DINOv2: norm1 / norm2                                    blocks.L.norm1 / blocks.L.norm2
DINOv2: layer_scale1.lambda1 / layer_scale2.lambda1      blocks.L.ls1.gamma / blocks.L.ls2.gamma
DINOv2: mlp.fc1 / mlp.fc2                                blocks.L.mlp.fc1 / blocks.L.mlp.fc2
DINOv2 SwiGLU: mlp.weights_in / mlp.weights_out          blocks.L.mlp.fc1 / blocks.L.mlp.fc2 (SwiGLUPacked)
layernorm                                                norm
======================================================  =======================================

DINOv2 with registers adds the position embedding to the class token but not to the registers;
timm's ``no_embed_class=True`` layout adds it to neither, so the class token's position is folded
into the class token (exact, as timm's own ``_convert_dinov2`` does). At the native image size the
timm model computes the same function as ``transformers``; at other sizes both interpolate the
patch position grid, with different bicubic settings (small differences).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..backbones import WeightsError

_LAYER = re.compile(r"^(?:encoder\.)?layers?\.(\d+)\.(.+)$")

_VIT_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_DINO_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",
    "mlp.weights_out": "mlp.fc2",
}


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Width of one SwiGLU branch in DINOv2's ``SwiGLUFFNFused`` (rounded to a multiple of 8)."""
    hidden = int(dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def timm_kwargs_from_config(config: dict[str, Any], layout: str) -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments equivalent to a ``transformers`` config.

    Values are plain JSON (layers named as in :data:`models.zoo.presets.LAYERS`)."""
    dim = int(config["hidden_size"])
    kw: dict[str, Any] = {
        "img_size": int(config.get("image_size", 224)),
        "patch_size": int(config.get("patch_size", 16)),
        "embed_dim": dim,
        "depth": int(config["num_hidden_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "norm_eps": float(config.get("layer_norm_eps", 1e-12 if layout == "hf-vit" else 1e-6)),
    }
    act = config.get("hidden_act", "gelu")
    if layout == "hf-vit":
        if act != "gelu":
            raise WeightsError(f"ViT checkpoint uses hidden_act={act!r}; only 'gelu' is supported")
        kw["mlp_ratio"] = int(config.get("intermediate_size", 4 * dim)) / dim
        return kw
    kw["init_values"] = float(config.get("layerscale_value", 1.0))
    ratio = float(config.get("mlp_ratio", 4))
    if config.get("use_swiglu_ffn", False):
        # fc1 of timm's SwiGLUPacked holds both branches: 2 * hidden outputs; +0.5 keeps int() exact
        kw["mlp_ratio"] = (2 * swiglu_hidden(dim, ratio) + 0.5) / dim
        kw["mlp_layer"] = "swiglu_packed"
        kw["act_layer"] = "silu"
    else:
        if act != "gelu":
            raise WeightsError(f"DINOv2 checkpoint uses hidden_act={act!r}; only 'gelu' is supported")
        kw["mlp_ratio"] = ratio
        kw["mlp_layer"] = "mlp"
        kw["act_layer"] = "gelu"
    registers = int(config.get("num_register_tokens", 0) or 0)
    if registers:
        kw["reg_tokens"] = registers
        kw["no_embed_class"] = True
    return kw


def convert_state_dict(
    sd: dict[str, torch.Tensor], layout: str, *, reg_tokens: int = 0
) -> dict[str, torch.Tensor]:
    """Rename a ``transformers`` ViT/DINOv2 state dict to timm's layout (see the module table).

    Raises :class:`WeightsError` naming any key it does not know, so a checkpoint of another
    architecture is refused rather than half loaded."""
    if layout not in ("hf-vit", "hf-dinov2"):
        raise ValueError(f"unknown checkpoint layout {layout!r}")
    block_map = _VIT_BLOCK if layout == "hf-vit" else _DINO_BLOCK
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(("pooler.", "embeddings.mask_token")):
            continue
        m = _LAYER.match(key)
        if m:
            layer, rest = m.groups()
            att = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if att:
                qkv.setdefault(layer, {}).setdefault(att.group(2), {})[att.group(1)] = value
                continue
            name, _, param = rest.rpartition(".")
            target = block_map.get(name) if param in ("weight", "bias") else block_map.get(rest)
            if target is None:
                unknown.append(key)
            elif name in block_map and param in ("weight", "bias"):
                out[f"blocks.{layer}.{target}.{param}"] = value
            else:
                out[f"blocks.{layer}.{target}"] = value
            continue
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.register_tokens": "reg_token",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight",
            "layernorm.bias": "norm.bias",
        }.get(key)
        if simple is None:
            unknown.append(key)
        else:
            out[simple] = value
    if unknown:
        raise WeightsError(
            f"{len(unknown)} checkpoint key(s) not part of a transformers {layout[3:]} model: "
            f"{unknown[:6]}; is this the right preset for the file?"
        )
    for layer, parts in qkv.items():
        for param, qkv_parts in parts.items():
            if set(qkv_parts) != {"query", "key", "value"}:
                raise WeightsError(f"layer {layer}: attention {param} lacks one of query/key/value")
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat(
                [qkv_parts["query"], qkv_parts["key"], qkv_parts["value"]], dim=0
            )
    if reg_tokens and "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out
