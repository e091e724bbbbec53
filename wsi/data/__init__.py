"""Data shipped inside the ``wsi`` package: the CC0 demo slide ``CMU-1-Small-Region.svs`` (its
licence note is ``LICENSE.md`` beside it).

The path is found through :mod:`importlib.resources`, so the same name works from a clone, an
editable install and an installed wheel or Docker image (the demo, the benchmarks' defaults, the
known-answer tasks and the tissue U-Net's training composites all read this one file).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: the shipped CC0 slide (a real Aperio SVS, 2220×2967 px, 0.499 µm/px; see LICENSE.md)
DEMO_SLIDE: Path = Path(str(files(__name__) / "CMU-1-Small-Region.svs"))

__all__ = ["DEMO_SLIDE"]
