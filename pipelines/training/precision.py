"""Mixed precision for every training loop: one spelling of ``amp`` and one object that autocasts,
scales the loss (fp16) and steps the optimiser.

``amp``: ``"auto"`` (bf16 on a GPU, full precision on CPU), ``"bf16"`` (autocast to bfloat16; no
loss scaling needed), ``"fp16"`` (autocast to float16 with dynamic loss scaling by
``torch.amp.GradScaler``; GPU only) or ``"none"`` (full precision). ``none`` rather than ``off``:
YAML reads a bare ``off`` as ``false``.

A loop reads::

    with precision.autocast():
        loss = model(x)
    precision.backward(loss / accum_steps)
    ...
    precision.unscale_(optimizer)       # before clipping: gradients in true units
    clip_gradients(model.parameters(), max_norm)
    precision.step(optimizer)           # skips the step when fp16 gradients overflowed

:class:`Precision` is stateful (the loss scale): the checkpointer saves it as ``"scaler"``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

from ..errors import ConfigError

Amp = Literal["auto", "bf16", "fp16", "none"]
AMP_VALUES: tuple[str, ...] = ("auto", "bf16", "fp16", "none")


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, whether to scale the loss)`` for ``amp`` on ``device``."""
    if amp not in AMP_VALUES:
        raise ConfigError(f"amp={amp!r} is not one of {list(AMP_VALUES)}")
    if amp == "auto":
        return (torch.bfloat16, False) if device.type == "cuda" else (None, False)
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        if device.type != "cuda":
            raise ConfigError("amp=fp16 needs a GPU; use amp=bf16 or amp=none on CPU")
        return torch.float16, True
    return None, False


class Precision:
    """Autocast, loss scaling and the optimiser step for ``amp`` on ``device``."""

    def __init__(self, amp: str, device: torch.device) -> None:
        self.amp = amp
        self.device = torch.device(device)
        self.dtype, use_scaler = amp_settings(amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this precision (a no-op in full precision)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled when fp16 loss scaling is on."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to true units (before clipping); no-op without a scaler."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` (through the scaler, which skips steps with inf/NaN gradients)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
