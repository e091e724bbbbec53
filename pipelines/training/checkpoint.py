"""Checkpoints: one file, one resume policy, for every training loop.

:class:`Checkpointer` saves and restores *state-holding objects* (anything with ``state_dict()`` /
``load_state_dict()``: the model, the optimiser, the :class:`~pipelines.training.precision.Precision`
loss scaler, wrapped tensors or generators) in one file, ``OUT/checkpoint.pt``, written to a
temporary name and renamed (:func:`wsi.atomic.atomic_path`). Two kinds of state:

- ``shared``: identical on every rank (model, optimiser, scaler) — saved once, by rank 0;
- ``per_rank``: different on each rank (global RNG state, an augmentation generator, the sampler
  position of the tile stream) — gathered from every rank into ``rank_states``.

The file's top level holds ``step``, ``world_size``, one entry per shared object, ``rank_states``
(a list indexed by rank) and whatever ``extra`` the job adds (its config, what prediction needs).

Resume policy (the same for every job): ``resume()`` does nothing unless asked; when asked and no
checkpoint exists it says so and starts from step 0; a checkpoint written by another world size is
refused with :class:`~pipelines.errors.ResumeError` (each rank's sampler position and RNG belong
to that rank: another world size cannot continue the same stream).

Loading uses ``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers, strings and
containers only (RNG states are stored as tensors), so nothing is ever unpickled.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from wsi.atomic import atomic_path

from ..errors import InputError, MissingInputError, ResumeError
from . import distributed


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch, numpy and Python as tensors and numbers."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
        "python_pos": int(random.getstate()[1][-1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class RNGState:
    """The process's global RNGs (torch, numpy, Python) as a stateful object."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class GeneratorState:
    """A ``torch.Generator`` as a stateful object."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class TensorState:
    """A tensor (a buffer kept outside a module, e.g. DINO's centre) as a stateful object."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def state_dict(self) -> torch.Tensor:
        return self.tensor

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.tensor.copy_(state)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary name, then rename: a file under ``path`` is complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True`` (nothing unpickled)."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling refusal (code in the file) or a damaged file
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise InputError(
            f"{path}: cannot be read as a checkpoint of tensors ({type(e).__name__}: {first}); "
            f"slidestream loads checkpoints with torch.load(weights_only=True) and never runs code "
            f"from a file — use a checkpoint written by slidestream"
        ) from None


class Checkpointer:
    """Saves and restores ``shared`` and ``per_rank`` stateful objects (see the module docstring).

    ``save`` must be called on every rank (it gathers the per-rank states); only rank 0 writes."""

    def __init__(
        self,
        path: str | Path,
        *,
        shared: dict[str, Stateful | None],
        per_rank: dict[str, Stateful] | None = None,
        info: distributed.DistInfo | None = None,
    ) -> None:
        self.path = Path(path)
        self.shared = {k: v for k, v in shared.items() if v is not None}
        self.per_rank = dict(per_rank or {})
        self.info = info or distributed.DistInfo()

    def save(self, step: int, **extra: Any) -> None:
        states = distributed.all_gather_objects({k: v.state_dict() for k, v in self.per_rank.items()})
        if self.info.is_main:
            state: dict[str, Any] = {"step": int(step), "world_size": self.info.world_size}
            state.update({k: v.state_dict() for k, v in self.shared.items()})
            state["rank_states"] = states
            state.update(extra)
            save_checkpoint(self.path, state)
        distributed.barrier()

    def resume(self, requested: bool, *, map_location: str | torch.device | None = None) -> int:
        """Restore every object when ``requested`` and the checkpoint exists; return the step to
        continue from (0 for a fresh start)."""
        if not requested:
            return 0
        if not self.path.exists():
            if self.info.is_main:
                print(f"--resume: no checkpoint {self.path}, starting from scratch", file=sys.stderr)
            return 0
        ck = load_checkpoint(self.path, map_location=map_location or self.info.device)
        states = ck.get("rank_states")
        written = ck.get("world_size", len(states) if states is not None else None)
        if states is None or written != self.info.world_size or len(states) != self.info.world_size:
            raise ResumeError(
                f"{self.path} was written by {written} process(es) but this run has "
                f"{self.info.world_size}; resume with the same world size (each rank's sampler "
                f"position and RNG belong to that rank)"
            )
        for k, obj in self.shared.items():
            if k not in ck:
                raise ResumeError(f"{self.path} has no {k!r} state; it was written by another job")
            obj.load_state_dict(ck[k])
        mine = states[self.info.rank]
        for k, obj in self.per_rank.items():
            obj.load_state_dict(mine[k])
        step = int(ck["step"])
        if self.info.is_main:
            print(f"resumed from {self.path} at step {step}", file=sys.stderr)
        return step
