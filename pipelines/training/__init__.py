"""Components every training loop shares (pretraining, segmentation, MIL, the tissue U-Net, and
fine-tuning next). Loops call them explicitly, top to bottom; nothing here runs a loop.

- distributed set-up: :func:`init_distributed` / :class:`DistInfo` (torchrun's environment,
  gloo on CPU, NCCL on GPU), :func:`barrier`, :func:`all_reduce_mean`, :func:`all_gather_objects`,
  :func:`micro_steps` / :func:`maybe_no_sync` (exact gradient accumulation: DDP all-reduce only
  on the last micro-step), :func:`cleanup`;
- seeding: :func:`seed_everything`, :func:`rank_seed`;
- precision: :class:`Precision` (``amp``: auto | bf16 | fp16 | none; autocast, fp16 loss
  scaling, the optimiser step), :func:`amp_settings`;
- optimiser: :class:`OptimConfig`, :func:`param_groups` (no weight decay on biases, norms, position
  embeddings, tokens; layer-wise LR decay), :func:`optimizer_for`, :func:`build_optimizer`,
  :func:`apply_schedules`, :func:`clip_gradients`;
- schedules: :func:`lr_schedule` (warm-up + cosine, linear LR scaling with the global batch),
  :func:`wd_schedule`, :func:`warmup_cosine`, :func:`scaled_lr`, :func:`peak_lr`;
- checkpointing: :class:`Checkpointer` over stateful objects (model, optimiser, scaler, RNG,
  sampler position; one resume policy, same world size), :class:`RNGState`,
  :class:`GeneratorState`, :class:`TensorState`, :func:`load_checkpoint`;
- data: :class:`Stream` (endless, resumable iteration over a loader's epochs),
  :class:`EpochPosition` (the epoch/position state of in-memory and map-style loaders);
- metrics: :class:`MetricsLogger` (JSON Lines + CSV, plots, resume without duplicate rows).
"""

from .checkpoint import (
    Checkpointer,
    GeneratorState,
    RNGState,
    TensorState,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    maybe_no_sync,
    micro_steps,
)
from .metrics import MetricsLogger, json_safe
from .optim import OptimConfig, apply_schedules, build_optimizer, clip_gradients, optimizer_for, param_groups
from .precision import AMP_VALUES, Amp, Precision, amp_settings
from .schedules import lr_schedule, peak_lr, scaled_lr, warmup_cosine, wd_schedule
from .seeding import rank_seed, seed_everything
from .stream import BatchLoader, EpochPosition, Stream

__all__ = [
    "AMP_VALUES",
    "Amp",
    "BatchLoader",
    "Checkpointer",
    "DistInfo",
    "EpochPosition",
    "GeneratorState",
    "MetricsLogger",
    "OptimConfig",
    "Precision",
    "RNGState",
    "Stream",
    "TensorState",
    "all_gather_objects",
    "all_reduce_mean",
    "amp_settings",
    "apply_schedules",
    "barrier",
    "build_optimizer",
    "cleanup",
    "clip_gradients",
    "init_distributed",
    "load_checkpoint",
    "lr_schedule",
    "maybe_no_sync",
    "micro_steps",
    "optimizer_for",
    "param_groups",
    "peak_lr",
    "rank_seed",
    "rng_state",
    "save_checkpoint",
    "scaled_lr",
    "seed_everything",
    "set_rng_state",
    "warmup_cosine",
    "wd_schedule",
    "json_safe",
]
