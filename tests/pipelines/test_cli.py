"""The ``slidestream`` command: every job follows one convention in its ``--help``, a typo in any
job's YAML config prints one line naming the file and the key and exits 2 (no traceback), and
``KEY=VALUE`` overrides may come anywhere on the line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.cli import main

#: every job of the CLI (command and action), in the one convention
JOBS = [
    ("pretrain",),
    ("embed",),
    ("mil", "train"),
    ("mil", "predict"),
    ("mil", "heatmap"),
    ("segment", "train"),
    ("segment", "predict"),
    ("tissue", "qc"),
    ("tissue", "train"),
    ("finetune",),
    ("eval",),
]


def test_cli_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "pipelines", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in (
        "info",
        "convert",
        "tissue",
        "pretrain",
        "embed",
        "mil",
        "segment",
        "finetune",
        "eval",
        "bench",
        "demo",
    ):
        assert cmd in out.stdout
    assert "[--config FILE] [--out DIR]" in out.stdout


@pytest.mark.parametrize("job", JOBS, ids=" ".join)
def test_every_job_help_shows_the_same_convention(job, capsys):
    with pytest.raises(SystemExit) as e:
        main([*job, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: slidestream {' '.join(job)} [-h] [--config FILE] [--out DIR]")
    assert "[KEY=VALUE ...]" in out and "config (every job):" in out
    assert "Settings are applied in order, later ones winning: the defaults, --config FILE" in out
    assert "config keys (" in out and "out" in out.split("config keys (")[1]


@pytest.mark.parametrize("job", JOBS, ids=" ".join)
def test_a_yaml_typo_in_any_job_prints_one_line_and_exits_2(job, tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("outt: somewhere\n")
    assert main([*job, "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"slidestream {job[0]}: error: {bad}: ")
    assert "unknown key(s) ['outt']" in err[0] and "valid keys:" in err[0] and "'out'" in err[0]


def test_nested_typo_names_the_section_and_a_bad_value_names_the_key(tmp_path, capsys):
    bad = tmp_path / "nested.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    assert main(["pretrain", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}: train: unknown key(s) ['stepz']" in err and "'steps'" in err
    bad.write_text(
        "train:\n  amp: off\n"
    )  # YAML reads a bare off as false: amp values are auto|bf16|fp16|none
    assert main(["segment", "train", "--config", str(bad)]) == 2
    assert "train.amp: False is not one of ['auto', 'bf16', 'fp16', 'none']" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad.write_text("train: [unclosed\n")
    assert main(["pretrain", "--config", str(bad)]) == 2
    assert "not valid YAML (line" in capsys.readouterr().err


def test_missing_required_value_names_flag_and_key(capsys):
    assert main(["mil", "train", "--labels", "x.csv", "--out", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "slidestream mil: error: missing --features (config key features); "
        "give it as a flag, in --config or as KEY=VALUE"
    )


def test_overrides_anywhere_and_garbage_rejected(capsys):
    # an override between flags is taken (the config check then fails on the value, naming it)
    assert main(["mil", "train", "folds=x", "--features", "f", "--labels", "l", "--out", "o", "seed=y"]) == 2
    err = capsys.readouterr().err
    assert "folds: expected an integer, got 'x'" in err
    assert main(["mil", "train", "--features", "f", "not-an-override"]) == 2
    assert "override 'not-an-override' must look like key.sub=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a second group of positionals that are not overrides
        main(["mil", "train", "seed=1", "--features", "f", "not-an-override"])
    assert e.value.code == 2
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err


def test_bench_help_and_readme_name_every_benchmark():
    """`slidestream --help` and the README's command list are written by hand: they must name every
    benchmark `slidestream bench` has."""
    import re

    from conftest import REPO

    from pipelines.bench import BENCHES
    from pipelines.cli import COMMANDS

    listed = set(COMMANDS["bench"][1].split(":", 1)[1].replace(" ", "").split(","))
    assert listed == set(BENCHES)
    line = re.search(r"^slidestream bench (\S+)", (REPO / "README.md").read_text(), re.M).group(1)
    assert set(line.split("|")) == set(BENCHES)
