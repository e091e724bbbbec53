"""Shared fixtures. Real slides come from ../shared/testdata when present (tests using them skip
otherwise); generated slides are always available. Each test module may add its own fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("SLIDESTREAM_TESTDATA", REPO.parent / "shared" / "testdata"))
DEMO_SLIDE = REPO / "data" / "demo" / "CMU-1-Small-Region.svs"


def testdata(rel: str) -> Path:
    """Path of a file in ../shared/testdata, or skip the test when it is not there."""
    p = TESTDATA / rel
    if not p.exists():
        pytest.skip(f"test data {rel} not present ({TESTDATA})")
    return p


testdata.__test__ = False  # a helper, not a test: modules import it by name


@pytest.fixture(scope="session")
def demo_slide() -> Path:
    """The CC0 CMU-1-Small-Region slide shipped in the repo (always present)."""
    assert DEMO_SLIDE.exists(), "data/demo/CMU-1-Small-Region.svs is part of the repo"
    return DEMO_SLIDE
