"""The table of pathology foundation-model presets: one :class:`Preset` per public encoder.

Every fact in a row comes from the model's published config, model card or reference loading
code, cited in ``source``; what could not be confirmed from a stored copy of those sources is
listed in ``unconfirmed`` (and printed by ``slidestream models``). The timm keyword arguments are
written as plain JSON values so a row can be shown, compared and recorded in a feature file:
layer classes are named by string (see :data:`LAYERS`) and resolved when the model is built.

``layout`` says how the hub repository stores the weights:

- ``timm``: a timm ``VisionTransformer``/``ResNet`` state dict (``pytorch_model.bin`` or
  ``model.safetensors``), loaded as is; the snapshot's ``config.json`` (timm's hub format) must name
  the same architecture, and its ``model_args`` are merged over the row's (architecture
  parameters only).
- ``hf-vit`` / ``hf-dinov2``: a Hugging Face ``transformers`` ``ViTModel`` / ``Dinov2Model`` (with or
  without registers) state dict. slidestream does not run ``transformers``: the snapshot's
  ``config.json`` is read, checked against the row, and the keys are converted to the equivalent
  timm ViT (:mod:`models.zoo.convert`), which computes the same function at the native input size.

``pooling`` is the embedding rule applied to the final (normed) token sequence of
``forward_features``: ``cls`` (the class token), ``cls+mean`` (the class token concatenated with the
mean of the patch tokens; register tokens are excluded from the mean), or ``layer3-avg`` (ResNet:
global average of the third stage's feature map, CLAM's truncated ResNet-50).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
KAIKO_MEAN = (0.5, 0.5, 0.5)
KAIKO_STD = (0.5, 0.5, 0.5)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

#: layer names allowed in ``timm_kwargs`` values (``mlp_layer``, ``act_layer``) -> timm/torch class
LAYERS = {
    "swiglu_packed": "timm.layers.SwiGLUPacked",
    "mlp": "timm.layers.Mlp",
    "silu": "torch.nn.SiLU",
    "gelu": "torch.nn.GELU",
}

TRIDENT = "https://github.com/mahmoodlab/TRIDENT/blob/main/trident/patch_encoder_models/load.py"
EVA = "https://github.com/kaiko-ai/eva/tree/main/src/eva/vision/models/networks/backbones/pathology"
KAIKO_REPO = "https://github.com/kaiko-ai/towards_large_pathology_fms (hubconf.py, README.md)"
LAZYSLIDE = "https://github.com/rendeirolab/LazySlide/tree/main/src/lazyslide/models/vision"

Pooling = Literal["cls", "cls+mean", "layer3-avg"]
Layout = Literal["timm", "hf-vit", "hf-dinov2"]


@dataclass(frozen=True, kw_only=True)
class Preset:
    """One public encoder: how to build it, load it, feed it and pool it, and where that is stated."""

    name: str
    title: str
    hub_id: str
    arch: str
    timm_kwargs: dict[str, Any]
    dim: int
    pooling: Pooling = "cls"
    reg_tokens: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    mpp: float | None = None
    layout: Layout = "timm"
    files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    licence: str = ""
    gated: bool = False
    params: str = ""
    source: str = ""
    unconfirmed: str = ""
    notes: str = field(default="", compare=False)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.hub_id}"


def _kaiko(
    name: str, title: str, arch: str, dim: int, extra: dict[str, Any] | None = None, reg_tokens: int = 0
) -> Preset:
    return Preset(
        name=name,
        title=title,
        hub_id=f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms",
        arch=arch,
        timm_kwargs={"num_classes": 0, "dynamic_img_size": True, **(extra or {})},
        dim=dim,
        reg_tokens=reg_tokens,
        mean=KAIKO_MEAN,
        std=KAIKO_STD,
        licence="kaiko-non-commercial",
        source=f"{KAIKO_REPO}; hub copy in timm format: https://huggingface.co/1aurent; {TRIDENT}",
        unconfirmed="µm/px (trained on several magnifications; none stated for inference)",
    )


def _lunit(name: str, title: str, arch: str) -> Preset:
    return Preset(
        name=name,
        title=title,
        hub_id=f"1aurent/{arch}.lunit_dino",
        arch=arch,
        timm_kwargs={"num_classes": 0, "dynamic_img_size": True},
        dim=384,
        mean=LUNIT_MEAN,
        std=LUNIT_STD,
        licence="lunit-non-commercial",
        source=(
            "https://github.com/lunit-io/benchmark-ssl-pathology/releases (weights); "
            f"{EVA}/lunit.py (mean/std); https://huggingface.co/1aurent/{arch}.lunit_dino; {TRIDENT}"
        ),
        unconfirmed="µm/px (trained on 20x and 40x tiles; none stated for inference)",
    )


H_OPTIMUS_0 = Preset(
    name="h-optimus-0",
    title="H-optimus-0",
    hub_id="bioptimus/H-optimus-0",
    arch="vit_giant_patch14_reg4_dinov2",
    timm_kwargs={
        "img_size": 224,
        "init_values": 1e-5,
        "dynamic_img_size": False,
        "num_classes": 0,
        "global_pool": "token",
    },
    dim=1536,
    reg_tokens=4,
    mean=BIOPTIMUS_MEAN,
    std=BIOPTIMUS_STD,
    mpp=0.5,
    licence="Apache-2.0",
    gated=True,
    params="1.1B",
    source=(
        "https://huggingface.co/bioptimus/H-optimus-0 (card: 224x224 at 0.5 µm/px, mean/std, "
        "init_values=1e-5) and its config.json"
    ),
)


def _h_optimus_1() -> Preset:
    """Same architecture and normalisation as H-optimus-0 (TRIDENT builds both alike)."""
    return dataclasses.replace(
        H_OPTIMUS_0,
        name="h-optimus-1",
        title="H-optimus-1",
        hub_id="bioptimus/H-optimus-1",
        licence="Bioptimus licence (non-commercial; commercial via AWS Marketplace)",
        source=f"https://huggingface.co/bioptimus/H-optimus-1; {TRIDENT}",
        unconfirmed="licence name; model-card kwargs and 0.5 µm/px taken from H-optimus-0's card",
    )


_PRESETS: tuple[Preset, ...] = (
    Preset(
        name="uni",
        title="UNI",
        hub_id="MahmoodLab/UNI",
        arch="vit_large_patch16_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        dim=1024,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        params="303M",
        source=f"https://huggingface.co/MahmoodLab/UNI; https://github.com/mahmoodlab/UNI; {TRIDENT}",
        unconfirmed="µm/px (trained at 20x; no value stated for inference)",
    ),
    Preset(
        name="uni2-h",
        title="UNI2-h",
        hub_id="MahmoodLab/UNI2-h",
        arch="vit_giant_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        dim=1536,
        reg_tokens=8,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        params="681M",
        source=f"https://huggingface.co/MahmoodLab/UNI2-h; https://github.com/mahmoodlab/UNI; {TRIDENT}",
        unconfirmed="µm/px (none stated)",
    ),
    Preset(
        name="virchow",
        title="Virchow",
        hub_id="paige-ai/Virchow",
        arch="vit_huge_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
        },
        dim=2560,
        pooling="cls+mean",
        licence="Apache-2.0 (plus the card's additional terms)",
        gated=True,
        params="632M",
        source=(
            "https://huggingface.co/paige-ai/Virchow (card: timm hf-hub, SwiGLUPacked/SiLU, "
            f"class token + mean of patch tokens = 2560); {TRIDENT}"
        ),
        unconfirmed="µm/px (trained at 20x; no value stated for inference)",
    ),
    Preset(
        name="virchow2",
        title="Virchow2",
        hub_id="paige-ai/Virchow2",
        arch="vit_huge_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
        },
        dim=2560,
        pooling="cls+mean",
        reg_tokens=4,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        params="632M",
        source=(
            "https://huggingface.co/paige-ai/Virchow2 (card: tokens 1-4 are registers, "
            f"embedding = class token + mean of tokens 5:); arXiv:2408.00738; {TRIDENT}"
        ),
        notes="mixed-magnification training (5x, 10x, 20x, 40x)",
        unconfirmed="µm/px (mixed magnifications; none stated)",
    ),
    H_OPTIMUS_0,
    _h_optimus_1(),
    Preset(
        name="h0-mini",
        title="H0-mini",
        hub_id="bioptimus/H0-mini",
        arch="vit_base_patch14_reg4_dinov2",
        timm_kwargs={
            "img_size": 224,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "dynamic_img_size": True,
            "num_classes": 0,
        },
        dim=1536,
        pooling="cls+mean",
        reg_tokens=4,
        mean=BIOPTIMUS_MEAN,
        std=BIOPTIMUS_STD,
        mpp=0.5,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        source=(
            "https://huggingface.co/bioptimus/H0-mini (class token + mean of tokens "
            f"num_prefix_tokens: = 1536); {TRIDENT}; {LAZYSLIDE}/h_optimus.py"
        ),
        unconfirmed=(
            "licence; µm/px; remaining architecture arguments come from the hub config.json "
            "(model_args), which is merged at load time"
        ),
    ),
    Preset(
        name="phikon",
        title="Phikon",
        hub_id="owkin/phikon",
        arch="vit_base_patch16_224",
        timm_kwargs={"img_size": 224, "num_classes": 0, "dynamic_img_size": True, "norm_eps": 1e-12},
        dim=768,
        layout="hf-vit",
        licence="Owkin non-commercial licence",
        source=(
            "https://huggingface.co/owkin/phikon (config.json: ViTModel, 768 wide, 12 layers, 12 heads, "
            f"patch 16, layer_norm_eps 1e-12; CLS of last_hidden_state); {TRIDENT}"
        ),
        unconfirmed="licence name; µm/px (trained at 20x)",
    ),
    Preset(
        name="phikon-v2",
        title="Phikon-v2",
        hub_id="owkin/phikon-v2",
        arch="vit_large_patch16_224",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        dim=1024,
        layout="hf-dinov2",
        licence="Owkin non-commercial licence",
        params="300M",
        source=f"https://huggingface.co/owkin/phikon-v2 (Dinov2Model; CLS of last_hidden_state); {TRIDENT}",
        unconfirmed=(
            "architecture details (read from the snapshot's config.json at load time and checked "
            "against ViT-L/16, 1024 wide); licence name; µm/px"
        ),
    ),
    Preset(
        name="prov-gigapath",
        title="Prov-GigaPath (tile encoder)",
        hub_id="prov-gigapath/prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        timm_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        dim=1536,
        licence="Prov-GigaPath licence (research use only)",
        gated=True,
        params="1.1B",
        source=(
            "https://github.com/prov-gigapath/prov-gigapath README (timm hf_hub, resize 256 bicubic, "
            f"centre crop 224, ImageNet mean/std); https://huggingface.co/prov-gigapath/prov-gigapath; {TRIDENT}"
        ),
        notes="the reference transform resizes to 256 and centre-crops 224",
        unconfirmed="licence name; µm/px (paper: 0.5 µm/px tiles)",
    ),
    _kaiko("kaiko-vits8", "kaiko.ai ViT-S/8", "vit_small_patch8_224", 384),
    _kaiko("kaiko-vits16", "kaiko.ai ViT-S/16", "vit_small_patch16_224", 384),
    _kaiko("kaiko-vitb8", "kaiko.ai ViT-B/8", "vit_base_patch8_224", 768),
    _kaiko("kaiko-vitb16", "kaiko.ai ViT-B/16", "vit_base_patch16_224", 768),
    _kaiko(
        "kaiko-vitl14",
        "kaiko.ai ViT-L/14",
        "vit_large_patch14_reg4_dinov2",
        1024,
        {"img_size": 518},
        reg_tokens=4,
    ),
    Preset(
        name="midnight-12k",
        title="Midnight-12k (kaiko.ai)",
        hub_id="kaiko-ai/midnight",
        arch="vit_giant_patch14_dinov2",
        timm_kwargs={"img_size": 224, "num_classes": 0, "dynamic_img_size": True},
        dim=3072,
        pooling="cls+mean",
        mean=KAIKO_MEAN,
        std=KAIKO_STD,
        layout="hf-dinov2",
        licence="MIT",
        params="1.1B",
        source=(
            "https://huggingface.co/kaiko-ai/midnight (card: extract_classification_embedding = "
            f"class token + mean of patch tokens, mean/std 0.5); {LAZYSLIDE}/midnight.py; {TRIDENT}"
        ),
        unconfirmed=(
            "architecture details (read from config.json at load time, checked against ViT-g/14 1536 "
            "wide); licence and gating taken from LazySlide's registry; µm/px (several magnifications)"
        ),
    ),
    Preset(
        name="hibou-b",
        title="Hibou-B",
        hub_id="histai/hibou-b",
        arch="vit_base_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "num_classes": 0, "dynamic_img_size": True},
        dim=768,
        reg_tokens=4,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        layout="hf-dinov2",
        licence="Apache-2.0",
        source=(
            "https://huggingface.co/histai/hibou-b (config.json: Dinov2ModelWithRegisters, 768 wide, "
            "12 layers, 4 registers, SwiGLU, patch 14; pooler_output = CLS); "
            f"{TRIDENT} (HIBOU mean/std); {LAZYSLIDE}/hibou.py"
        ),
        notes="hub code is transformers remote code (trust_remote_code); slidestream converts the keys",
        unconfirmed="licence; µm/px",
    ),
    _lunit("lunit-vits8", "Lunit DINO ViT-S/8", "vit_small_patch8_224"),
    _lunit("lunit-vits16", "Lunit DINO ViT-S/16", "vit_small_patch16_224"),
    Preset(
        name="resnet50-trunc",
        title="ResNet-50 truncated after layer 3 (CLAM's ImageNet baseline)",
        hub_id="timm/resnet50.tv_in1k",
        arch="resnet50",
        timm_kwargs={"num_classes": 0},
        dim=1024,
        pooling="layer3-avg",
        licence="BSD-3-Clause (torchvision weights)",
        source=(
            "https://github.com/mahmoodlab/CLAM/blob/master/models/resnet_custom.py "
            "(resnet50_baseline: layers 1-3 + adaptive average pool, torchvision resnet50-19c8e357 "
            f"weights); https://huggingface.co/timm/resnet50.tv_in1k; {TRIDENT}"
        ),
        unconfirmed="µm/px (an ImageNet model; CLAM tiles at 20x by default)",
    ),
)

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}
