"""The end-to-end demo (`make demo` runs the same with full settings)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo-output"
    r = subprocess.run(
        [sys.executable, "-m", "pipelines", "demo", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    bad = {s["stage"]: s["error"] for s in summary if s["status"] != "ok"}
    assert r.returncode == 0 and not bad, (bad, r.stderr[-3000:])
    html = (out / "index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", html)
    for key in (
        "thumbnail.png",
        "mosaic.png",
        "_qc.png",
        "roc.png",
        "heatmap.png",
        "overlay.png",
        "loss.png",
    ):
        assert any(key in i for i in images), f"{key} missing from the report"
    for img in images:
        assert (out / img).stat().st_size > 1000, img
    stages = {s["stage"]: s for s in summary}
    assert stages["mil"]["metrics"]["auroc"] >= 0.5
    assert all(v > 0 for k, v in stages["segment"]["metrics"].items() if k.startswith("Dice"))
