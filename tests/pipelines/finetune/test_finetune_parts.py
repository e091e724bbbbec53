"""The parts of `slidestream finetune` below the loop: tile labels from annotation masks, the
ImageFolder loader's order and resume (the same order as a tile list), the augmentation switch,
layer-wise LR decay and weight-decay groups on the classifier, and the recipe combinations that
are refused before anything trains."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import REPO

from models.finetune import Classifier
from pipelines.config import ConfigError, load_config
from pipelines.finetune import MISSING, FinetuneConfig
from pipelines.finetune.data import FinetuneData, SplitData
from pipelines.finetune.loaders import Augment, ImageFolderDataset, ImageLoader, mask_labels
from pipelines.finetune.objectives import Trainable
from pipelines.finetune.train import check_recipe
from pipelines.tasks import DEMO_TILES
from pipelines.training import optimizer_for
from wsi.sampling import IGNORE_LABEL, tile_list_order


def test_mask_labels_majority_of_annotated_pixels():
    m = torch.full((3, 4, 4), IGNORE_LABEL, dtype=torch.uint8)
    m[0, :3] = 1  # 12 px of class 1, 4 unannotated
    m[0, 3] = 0
    m[1, :1] = 2  # 4 px of class 2 beat 12 unannotated ones
    assert mask_labels(m, 3).tolist() == [1, 2, MISSING]


def test_image_loader_order_shards_and_resume(tmp_path):
    from PIL import Image

    paths = []
    for i in range(11):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(p)
        paths.append(str(p))
    ds = ImageFolderDataset(paths, 4)
    assert ds[3]["image"].shape == (3, 4, 4) and int(ds[3]["image"][0, 0, 0]) == 3  # resized, same value
    ranks = []
    for r in (0, 1):
        ld = ImageLoader(ds, 2, shuffle=True, seed=5, rank=r, world_size=2)
        ld.set_epoch(1)
        ranks.append([t for b in ld for t in b["tile"].tolist()])
    order = tile_list_order(11, shuffle=True, seed=5, epoch=1, num_shards=2)
    assert ranks[0] == order[0::2][:4].tolist() and ranks[1] == order[1::2][:4].tolist()  # full batches
    ld = ImageLoader(ds, 2, shuffle=True, seed=5)
    it = iter(ld)
    first = next(it)["tile"].tolist()
    state = ld.state_dict()
    rest = [b["tile"].tolist() for b in it]
    again = ImageLoader(ds, 2, shuffle=True, seed=5)
    again.load_state_dict(state)
    assert [b["tile"].tolist() for b in again] == rest and len(rest) == 4 and first not in rest
    evals = ImageLoader(ds, 4, shuffle=False)
    assert [t for b in evals for t in b["tile"].tolist()] == list(range(11))  # every image, in order
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(Exception, match="cannot be read as an image"):
        ImageFolderDataset([str(tmp_path / "bad.png")], 4)[0]


def test_augment_off_is_the_tiles_as_read():
    cfg = load_config(FinetuneConfig, None, ["augment.enabled=false"])
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(Augment(cfg.augment, 16)(x, g), x.float() / 255)
    on = Augment(load_config(FinetuneConfig, None).augment, 16)
    y = on(x, g)
    assert y.shape == (4, 3, 16, 16) and not torch.allclose(y, x.float() / 255)


def test_layer_decay_and_no_weight_decay_on_the_classifier():
    enc = timm.create_model("test_vit", num_classes=0, img_size=32)
    model = Trainable(Classifier(enc, enc.num_features, [3]), 1, "uncertainty")
    cfg = load_config(FinetuneConfig, None, ["optim.layer_decay=0.5", "optim.weight_decay=0.1"])
    opt = optimizer_for(model, cfg.optim)
    n_blocks = len(enc.blocks)
    scale = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[id(p)] = (g["lr_scale"], g["weight_decay"])
    head = model.model.heads[0]
    assert scale[id(head.weight)] == (1.0, 0.1) and scale[id(head.bias)] == (1.0, 0.0)
    last = enc.blocks[-1]
    assert scale[id(last.mlp.fc1.weight)] == (0.5, 0.1) and scale[id(last.norm1.weight)] == (0.5, 0.0)
    assert scale[id(enc.patch_embed.proj.weight)][0] == pytest.approx(0.5 ** (n_blocks + 1))
    assert scale[id(enc.pos_embed)][1] == 0.0


def _data(kind: str = "csv", n: int = 64, tasks: int = 1) -> FinetuneData:
    y = np.zeros((n, tasks), np.int64)
    split = SplitData(kind, [("s", 0, 0, 1.0)] * n, y, ["g"] * n)
    return FinetuneData([f"t{i}" for i in range(tasks)], [["a", "b"]] * tasks, {"train": split})


@pytest.mark.parametrize(
    "overrides, data, message",
    [
        (["loss.name=tfkd_reg", "loss.mixup.mixup_alpha=0.2"], _data(), "does not combine"),
        (["loss.mixup.mixup_alpha=0.2", "train.batch_size=7"], _data(), "even train.batch_size"),
        (["loss.name=self_distill"], _data(tasks=2), "multi-task"),
        (["loss.name=kd"], _data(), "needs loss.kd.teacher"),
        (["loss.name=supcon", "model.mode=linear"], _data(), "first stage trains the encoder"),
        (["train.batch_size=128"], _data(n=100), "fewer than train.batch_size"),
    ],
)
def test_recipe_combinations_refused_before_training(overrides, data, message):
    cfg = load_config(
        FinetuneConfig,
        REPO / "pipelines" / "configs" / "finetune" / "ce.yaml",
        [f"data.train.csv={DEMO_TILES}", *overrides],
    )
    with pytest.raises(ConfigError, match=message):
        check_recipe(cfg, data)
