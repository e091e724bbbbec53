"""What a weights file may say about its architecture, checked without importing timm (the tissue
U-Net reads its config with these; :mod:`models.backbones` re-exports them).

Importing timm pulls in ``torch._dynamo``; imported after ``torch.distributed.init_process_group``,
that keeps the process group alive past ``destroy_process_group`` (torch 2.14), and a gloo worker
thread left at interpreter exit can abort the process. Reading a small U-Net's config should not
import a model zoo anyway."""

from __future__ import annotations

import os
import re
from typing import Any


class WeightsError(ValueError):
    """Weights that cannot be loaded; the message names the file and the fix."""


#: timm keyword arguments a file may set: the architecture (what ``save_backbone``, pretraining's
#: ``timm_kwargs`` and the model presets of ``models.zoo`` use), never files, hubs or code
ARCH_KEYS = frozenset(
    {
        # sizes and depths
        "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
        "mlp_ratio", "depths", "dims", "embed_dims", "window_size", "output_stride",
        # token layout and pooling
        "global_pool", "class_token", "no_embed_class", "reg_tokens", "pos_embed", "dynamic_img_size",
        "dynamic_img_pad", "fc_norm", "pre_norm", "final_norm",
        # block details
        "qkv_bias", "qk_norm", "init_values", "ls_init_value", "mlp_layer", "act_layer", "norm_eps",
        "stem_type", "weight_init",
        # regularisation of training (numbers only)
        "drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "patch_drop_rate",
    }
)  # fmt: skip
_REFUSED_HINT = ("checkpoint", "pretrained", "cache", "file", "path", "url", "hub", "dir")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,160}$")


def _plain_value(v: Any) -> bool:
    if isinstance(v, bool) or v is None or isinstance(v, (int, float)):
        return True
    if isinstance(v, str):
        return bool(_NAME.match(v)) and ".." not in v
    if isinstance(v, (list, tuple)):
        return len(v) <= 64 and all(isinstance(x, (bool, int, float)) for x in v)
    return False


def check_arch_kwargs(
    kwargs: Any, source: str | os.PathLike, *, allowed: frozenset[str] = ARCH_KEYS
) -> dict[str, Any]:
    """``kwargs`` read from ``source`` (a weights file, its sidecar, a checkpoint, a ``config.json``)
    if every key is an architecture key (``allowed``, default :data:`ARCH_KEYS`) with a plain value
    (number, boolean, short name, list of numbers); else :class:`WeightsError` naming the file and
    the key. What is refused, above all: ``checkpoint_path``, ``pretrained*``, ``pretrained_cfg*``,
    ``cache_dir`` and anything holding a path or URL — timm would load whatever file they name."""
    if not isinstance(kwargs, dict):
        raise WeightsError(f"{source}: architecture options must be a mapping, got {type(kwargs).__name__}")
    for k, v in kwargs.items():
        if k not in allowed:
            why = (
                "it would make timm load a file or a hub entry"
                if any(h in str(k).lower() for h in _REFUSED_HINT)
                else "it is not an architecture option"
            )
            raise WeightsError(
                f"{source}: refusing option {k!r} from the file ({why}); only architecture keys may come "
                f"from a weights file, sidecar or checkpoint ({', '.join(sorted(allowed))}) — remove it"
            )
        if not _plain_value(v):
            raise WeightsError(
                f"{source}: refusing option {k}={v!r} from the file: only numbers, booleans, short names and "
                f"lists of numbers may come from a weights file (no paths, URLs or nested settings)"
            )
    return dict(kwargs)


def check_arch_name(name: Any, source: str | os.PathLike) -> str:
    """A timm architecture name read from ``source``: a plain name (``vit_small_patch16_224``, with
    an optional ``.tag``), never ``hf-hub:``/``local-dir:`` or a path."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise WeightsError(
            f"{source}: architecture name {name!r} is not a plain timm model name (no hub, directory or path "
            f"names may come from a weights file); pass the name explicitly"
        )
    return name
