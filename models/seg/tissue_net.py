"""The tissue-foreground U-Net: load the shipped safetensors weights and predict a tissue
probability map for an RGB uint8 thumbnail.

The weights file carries its architecture in the safetensors metadata (``"config"``: the
:class:`~models.seg.unet.UNet` keyword arguments plus ``input_scale``, as JSON) so a file is self-describing. Weights
are read with ``safetensors`` only, never unpickled. Pure torch/numpy: this module does not import
``wsi``. ``models/weights/tissue_unet.json`` is the recipe that produced the shipped file (written
by ``slidestream tissue train``); it ships no measured figures, which would go stale with the code
that they compare against: ``slidestream bench tissue`` measures the shipped weights against Otsu.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNet

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "tissue_unet.safetensors"
#: architecture of the tissue net (used when a weights file has no "config" metadata): U-Net
#: keyword arguments plus ``input_scale``, the factor the thumbnail is resized by before the U-Net
#: (its logits are resized back, bilinearly, to the thumbnail)
DEFAULT_CONFIG = {
    "in_channels": 3,
    "n_classes": 1,
    "depth": 4,
    "width": 8,
    "norm": "batch",
    "dropout": 0.0,
    "input_scale": 0.5,
}


class TissueNet(nn.Module):
    """A :class:`UNet` run on the input resized by ``input_scale`` (area averaging); returns
    logits (B, 1, H, W) at the input's resolution. Half resolution makes the net 4× cheaper; a
    tissue outline at thumbnail scale loses little."""

    def __init__(self, input_scale: float = 0.5, **unet_kwargs):
        super().__init__()
        if not 0 < input_scale <= 1:
            raise ValueError(f"input_scale must be in (0, 1], got {input_scale}")
        self.input_scale = float(input_scale)
        self.unet = UNet(**unet_kwargs)
        self.config = {**self.unet.config, "input_scale": self.input_scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.input_scale < 1:
            size = (max(1, round(h * self.input_scale)), max(1, round(w * self.input_scale)))
            x = F.interpolate(x, size=size, mode="area")
        logits = self.unet(x)
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits


_cache: dict[tuple[str, int, int], TissueNet] = {}
_lock = threading.RLock()


def to_input(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) → float (B, 3, H, W) in [-1, 1]: the network's input."""
    if rgb.ndim != 4:
        raise ValueError(f"expected a batch of RGB images, got shape {tuple(rgb.shape)}")
    if rgb.shape[-1] == 3 and rgb.shape[1] != 3:
        rgb = rgb.permute(0, 3, 1, 2)
    return rgb.float().div(127.5).sub(1.0)


def build(config: dict | None = None) -> TissueNet:
    """A fresh tissue net with ``config`` (defaults: :data:`DEFAULT_CONFIG`)."""
    return TissueNet(**{**DEFAULT_CONFIG, **(config or {})})


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) of a safetensors file; metadata values JSON-decoded where possible."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"tissue U-Net weights {path} not found; train them with `slidestream tissue train`"
        )
    if path.suffix != ".safetensors":
        from ..weights_check import WeightsError

        raise WeightsError(
            f"{path}: tissue U-Net weights must be a .safetensors file (pickles are never loaded)"
        )
    state = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            names = f.keys()  # a safe_open handle is not iterable
            for k in names:
                state[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - safetensors' errors (a pickle, a damaged header) are not OSErrors
        from ..weights_check import WeightsError

        raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return state, meta


def load(weights: str | os.PathLike | None = None) -> TissueNet:
    """The tissue U-Net in eval mode with ``weights`` (default: the shipped file). Cached per
    file (path, size, mtime), so repeated calls are free."""
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    st = path.stat() if path.exists() else None
    key = (str(path.resolve()), st.st_size if st else -1, st.st_mtime_ns if st else -1)
    with _lock:
        if key in _cache:
            return _cache[key]
        state, meta = read_weights(path)
        config = meta.get("config") if isinstance(meta.get("config"), dict) else None
        if config is not None:  # from the file: the U-Net's own keys with plain values, nothing else
            from ..weights_check import check_arch_kwargs

            config = check_arch_kwargs(config, path, allowed=frozenset(DEFAULT_CONFIG))
        model = build(config)
        model.load_state_dict(state, strict=True)
        model.eval()
        _cache[key] = model
        return model


def save(model: TissueNet, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model``'s weights as safetensors with its config (and ``metadata``, JSON-encoded)
    in the header; written to a temporary name and renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(model.config), "format": "pt"}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # a weights file is data to share, not a secret
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@torch.inference_mode()
def predict_proba(
    rgb: np.ndarray,
    *,
    weights: str | os.PathLike | None = None,
    model: TissueNet | None = None,
    threads: int | None = 1,
) -> np.ndarray:
    """Tissue probability, float32 (h, w) in [0, 1], of an RGB uint8 image (h, w, 3) of any size
    (a whole-slide thumbnail). Runs on the CPU in one pass with ``threads`` torch threads for the
    duration of the call (default 1: a thumbnail takes a fraction of a second, and one thread
    avoids oversubscribing a busy machine or DataLoader workers; None keeps torch's setting)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (h, w, 3), got {rgb.dtype} {rgb.shape}")
    net = model if model is not None else load(weights)
    x = to_input(torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True))[None])
    with _lock:
        was_training, n_threads = net.training, torch.get_num_threads()
        net.eval()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            prob = torch.sigmoid(net(x))[0, 0]
        finally:
            net.train(was_training)
            torch.set_num_threads(n_threads)
    return prob.numpy().astype(np.float32, copy=False)
