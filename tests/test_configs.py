"""Every YAML shipped under ``pipelines/configs/`` loads into its job's typed config (one test for all of
them: a file added to ``pipelines/configs/`` is loaded here too, or this test names the folder it cannot map)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from pipelines.config import load_config
from pipelines.embed import EmbedConfig
from pipelines.finetune import FinetuneConfig
from pipelines.mil import MILConfig
from pipelines.pretrain import PretrainConfig
from pipelines.segment import SegmentConfig

#: pipelines/configs/<folder>/ -> the config class its files map onto
CONFIG_OF = {
    "embed": EmbedConfig,
    "finetune": FinetuneConfig,
    "mil": MILConfig,
    "pretrain": PretrainConfig,
    "segment": SegmentConfig,
}
SHIPPED = sorted((REPO / "pipelines" / "configs").rglob("*.yaml"))


def test_configs_exist_and_every_folder_has_a_job():
    assert len(SHIPPED) >= 9
    folders = {p.relative_to(REPO / "pipelines" / "configs").parts[0] for p in SHIPPED}
    assert folders <= set(CONFIG_OF), folders - set(CONFIG_OF)
    assert {p.name for p in SHIPPED} >= {"noisy-and.yaml", "abmil.yaml", "tiny-cpu.yaml", "unet-cpu.yaml"}
    recipes = {p.stem for p in SHIPPED if p.parent.name == "finetune"}
    assert recipes == {"ce", "ls", "mixup", "kd", "tfkd-self", "tfkd-reg", "self-distill", "supcon"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "pipelines" / "configs")))
def test_shipped_yaml_loads(path: Path):
    cfg = load_config(CONFIG_OF[path.relative_to(REPO / "pipelines" / "configs").parts[0]], path)
    if isinstance(cfg, MILConfig):
        assert cfg.head.name in path.stem.replace("-", "_") and cfg.train.epochs > 0
    if isinstance(cfg, PretrainConfig):
        assert cfg.optim.lr_scaling == "linear" and cfg.train.amp in ("auto", "bf16")
    if isinstance(cfg, FinetuneConfig):  # each recipe: its loss, the demo data, the same budget
        name = {"ls": "ce", "mixup": "ce"}.get(path.stem, path.stem.replace("-", "_"))
        assert cfg.loss.name == name and cfg.data.train.csv == "wsi/data/tissue-tiles.csv"
        assert cfg.optim.lr_scaling == "linear" and cfg.out == f"runs/finetune/{path.stem}"
        assert cfg.train.steps + (cfg.loss.supcon.steps if name == "supcon" else 0) == 300
        assert (cfg.loss.label_smoothing > 0) == (path.stem == "ls") and cfg.loss.mixup.enabled == (
            path.stem == "mixup"
        )
        if name in ("kd", "tfkd_self"):
            assert cfg.loss.kd.teacher == "runs/finetune/ce"
    if isinstance(cfg, SegmentConfig):
        assert cfg.data.classes[0] == "background" and cfg.optim.clip_grad == 1.0


def test_no_config_outside_the_shipped_folder():
    """Configs are package data under pipelines/configs/ (in the wheel, and found by the demo's and
    the benchmarks' defaults through pipelines.config.SHIPPED_CONFIGS); a YAML config anywhere else
    in the repository would not ship."""
    import subprocess

    from pipelines.config import SHIPPED_CONFIGS

    assert SHIPPED_CONFIGS.resolve() == (REPO / "pipelines" / "configs").resolve()
    tracked = subprocess.run(
        ["git", "ls-files", "*.yaml", "*.yml"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    stray = [p for p in tracked if not p.startswith(("pipelines/configs/", ".", "tests/"))]
    assert not stray, f"YAML outside pipelines/configs/ (not shipped): {stray}"
