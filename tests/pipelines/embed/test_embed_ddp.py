"""``slidestream embed`` under real ``torchrun`` with 2 gloo processes: slides are split between
the ranks, rank 0 merges the manifest, every slide's features equal the 1-process run's, and a
slide whose reader aborts natively (OpenSlide's GLib allocation failure, tests/hostile.py) is a
``Crashed(SIGABRT)`` row while its rank goes on (each rank reads in its own slide worker)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import EMBED_ARCH as ARCH
from conftest import make_embed_slide as make_slide
from conftest import torchrun
from hostile import glib_abort_tiff, worker_data_bytes

from pipelines.embed import read_rows


@pytest.mark.ddp
@pytest.mark.usefixtures("one_torch_thread")
def test_two_ranks_match_one_process(tmp_path):
    import torch

    from models import backbones
    from pipelines.embed import embed_slides

    src = tmp_path / "slides"
    src.mkdir()
    for i, (o, size) in enumerate(
        [
            ((600, 900), (512, 384)),
            ((1000, 1600), (384, 384)),
            ((300, 2200), (512, 256)),
            ((1300, 400), (256, 256)),
        ]
    ):
        make_slide(src / f"s{i}.svs", origin=o, size=size)
    (src / "zz_garbage.svs").write_bytes(b"not a slide at all" * 100)
    glib_abort_tiff(src / "crash.tif")
    memory_gb = (worker_data_bytes(("pipelines.embed.worker",)) + (384 << 20)) / 2**30
    torch.manual_seed(0)
    enc = backbones.save_backbone(backbones.create(ARCH), tmp_path / "enc.safetensors")
    kw = {"mpp": 0.5, "tile_size": 64, "batch_size": 8, "mpp_override": 0.5}

    one = tmp_path / "one"
    # 1 thread, as the torchrun processes
    single = embed_slides(src, enc, out=one, progress=False, isolation={"memory_gb": memory_gb}, **kw)
    assert single.counts == {"done": 4, "skipped": 0, "failed": 2}

    two = tmp_path / "two"
    r = torchrun(
        "-m",
        "pipelines.cli",
        "embed",
        "--slides",
        str(src),
        "--encoder",
        str(enc),
        "--out",
        str(two),
        "--mpp",
        "0.5",
        "--tile-size",
        "64",
        "--batch-size",
        "8",
        "--mpp-override",
        "0.5",
        "--worker-memory-gb",
        f"{memory_gb:.3f}",
        "--no-progress",
    )
    assert r.returncode != 0  # the garbage slide failed: every rank exits 1, after the merge
    rows = {x.slide_id: x for x in read_rows(two / "manifest.csv")}
    assert set(rows) == {"s0", "s1", "s2", "s3", "zz_garbage", "crash"}, r.stderr[-3000:]
    assert rows["zz_garbage"].status == "failed" and rows["zz_garbage"].error == "UnsupportedSlideError"
    assert rows["crash"].status == "failed" and rows["crash"].error == "Crashed(SIGABRT)"
    assert {x.rank for x in rows.values()} == {0, 1}  # both ranks worked
    # balanced by size: the largest slide's rank does not also get the second largest
    sizes = {p.stem: p.stat().st_size for p in src.iterdir()}
    big = sorted(sizes, key=sizes.get, reverse=True)
    assert rows[big[0]].rank != rows[big[1]].rank
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]  # parts merged, no temp files
    for a in sorted(one.glob("*.h5")):
        with h5py.File(a, "r") as fa, h5py.File(two / a.name, "r") as fb:
            np.testing.assert_array_equal(fa["features"][()], fb["features"][()])
            np.testing.assert_array_equal(fa["coords"][()], fb["coords"][()])
    assert sorted(p.name for p in two.glob("*.h5")) == ["s0.h5", "s1.h5", "s2.h5", "s3.h5"]
    assert "failed slides" in r.stderr and "zz_garbage" in r.stderr
