"""pipelines.config: typed YAML configs (nested dataclasses, type checks, unknown keys named with
the valid ones) and the one command-line convention."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.config import ConfigError, load_config


@dataclasses.dataclass(kw_only=True)
class _Optim:
    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])


@dataclasses.dataclass(kw_only=True)
class _Job:
    name: str = "x"
    steps: int = 10
    optim: _Optim = dataclasses.field(default_factory=_Optim)
    mode: str | None = None


def test_config_loading(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\noptim:\n  lr: 0.01\n")
    cfg = load_config(_Job, p, overrides=["optim.betas=[0.8, 0.9]", "mode=fast"])
    assert cfg.steps == 5 and cfg.optim.lr == 0.01 and cfg.optim.betas == [0.8, 0.9] and cfg.mode == "fast"
    p.write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match="stepz.*valid keys"):
        load_config(_Job, p)
    p.write_text("steps: many\n")
    with pytest.raises(ConfigError, match="integer"):
        load_config(_Job, p)


@dataclasses.dataclass(kw_only=True)
class _Run:
    out: str = ""
    slides: list[str] = dataclasses.field(default_factory=list)
    optim: _Optim = dataclasses.field(default_factory=lambda: _Optim(lr=0.5))
    steps: int = 10
    quiet: bool = False


def test_one_convention_precedence_and_section_defaults(tmp_path):
    """defaults < --config FILE < named flags < --out < KEY=VALUE; a section given in part keeps
    the job's own defaults for its other keys."""
    import argparse

    from pipelines.config import Flag, add_job_arguments, config_from_args

    flags = (
        Flag("steps", "steps", type=int),
        Flag("slides", "slides", nargs="+"),
        Flag("quiet", "quiet", action="store_true"),
    )
    p = argparse.ArgumentParser()
    add_job_arguments(p, _Run, flags)
    y = tmp_path / "c.yaml"
    y.write_text("out: from-yaml\nsteps: 3\noptim:\n  betas: [0.5, 0.6]\n")
    cfg = config_from_args(_Run, p.parse_args(["--config", str(y)]), flags)
    assert (cfg.out, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("from-yaml", 3, 0.5, [0.5, 0.6])
    args = p.parse_args(
        ["--config", str(y), "--steps", "7", "--out", "o", "steps=9", "--quiet", "--slides", "a", "b"]
    )
    cfg = config_from_args(_Run, args, flags)
    assert (cfg.out, cfg.steps, cfg.quiet, cfg.slides) == ("o", 9, True, ["a", "b"])
    with pytest.raises(ConfigError, match=r"missing --slides \(config key slides\)"):
        config_from_args(_Run, p.parse_args([]), flags, required=("slides",))
