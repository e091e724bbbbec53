"""The typed config of ``slidestream eval`` (:class:`EvalConfig`) and of its slide and
segmentation tasks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class SlideTaskConfig:
    """Embed ``slides`` with the encoder, then cross-validate MIL on ``labels``."""

    slides: str
    labels: str
    name: str = "slides"
    mpp: float = 0.5
    tile_size: int = 224
    folds: int = 3
    head: str = "abmil"
    epochs: int = 40


@dataclass(kw_only=True)
class SegTaskConfig:
    """The built-in exact-label task: a 1×1 decoder on the frozen encoder (trained once per seed of
    ``EvalConfig.seeds``)."""

    name: str = "exact-label"
    steps: int = 120
    #: draws the task's composites (the training seeds are EvalConfig.seeds)
    seed: int = 0


@dataclass(kw_only=True)
class EvalConfig:
    #: output directory for results.csv/json/md
    out: str = ""
    #: timm names, .safetensors from pretrain, name=weights, or presets (uni, hf-hub:ORG/NAME;
    #: `slidestream models`), compared side by side
    encoders: list[str] = field(default_factory=list)
    #: folder per class, .h5/.zarr with images/labels[/split], or a built-in task (tissue-types, magnification)
    patch_tasks: list[str] = field(default_factory=list)
    slide_tasks: list[SlideTaskConfig] = field(default_factory=list)
    seg_tasks: list[SegTaskConfig] = field(default_factory=list)
    #: one run of every seeded probe per seed (linear, few-shot, MIL, segmentation decoder); a spread
    #: is reported only when measured over at least two runs
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    #: examples per class for the few-shot probe
    shots: int = 5
    #: neighbours for kNN
    k: int = 20
    batch_size: int = 64
    progress: bool = True
