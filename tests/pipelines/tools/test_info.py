"""``slidestream info`` and ``slidestream bench read`` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_SLIDE

from pipelines.cli import main


def test_info_json_on_demo_slide(capsys):
    assert main(["info", "--json", str(DEMO_SLIDE)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "tiff" and info["vendor"] == "aperio"
    assert info["dimensions"] == [2220, 2967] and info["level_count"] == 1
    assert info["mpp"] == pytest.approx(0.499)
    assert info["levels"][0] == {
        "level": 0,
        "width": 2220,
        "height": 2967,
        "downsample": 1.0,
        "mpp": pytest.approx(0.499),
        "tile": [240, 240],
    }
    assert set(info["associated_images"]) == {"thumbnail", "label", "macro"}


def test_info_text_backend_and_mpp_override(capsys):
    assert main(["info", str(DEMO_SLIDE), "--backend", "openslide", "--mpp", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "backend:  openslide" in out and "0.25 µm/px" in out and "240x240" in out


def test_info_bad_slide_exits_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all" * 20)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert main(["info", str(tmp_path / "missing.svs")]) == 2
    assert "not found" in capsys.readouterr().err
