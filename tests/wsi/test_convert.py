"""`wsi.convert.convert` and `slidestream convert`: lossless round trips, JPEG pass-through bit for
bit, NGFF 0.5 metadata, overwrite refusal and write-then-rename under failure and interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import DEMO_SLIDE, REPO

import wsi
import wsi.codecs  # noqa: F401 - zarr-python reads slidestream.jpeg chunks
from wsi.convert import convert
from wsi.errors import UnreadableTileError
from wsi.synth import load_demo_pixels, write_tiff_pyramid


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return load_demo_pixels(DEMO_SLIDE)[:600, :800].copy()


def _level_pixels(slide, level: int) -> np.ndarray:
    return slide.read_region((0, 0), level, slide.level_dimensions[level])


def _tmp_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("codec", ["zstd", "none", "blosc"])
def test_lossless_round_trip_is_pixel_identical(tmp_path, pixels, codec):
    src = tmp_path / "src.tif"
    write_tiff_pyramid(src, pixels, tile=128, downsamples=(1, 2), flavor="generic", compression="deflate")
    out = convert(src, tmp_path / "out.zarr", tile=128, codec=codec, shard_tiles=2, progress=False)
    with wsi.open_slide(src) as s, wsi.open_slide(out) as z:
        assert z.level_dimensions == s.level_dimensions and z.mpp == pytest.approx(s.mpp)
        for level in range(s.level_count):
            ref = _level_pixels(s, level)
            assert np.array_equal(_level_pixels(z, level), ref)
            # zarr-python reads the shards we assembled identically
            arr = zarr.open_array(str(Path(out) / str(level)), mode="r")
            assert np.array_equal(arr[:].transpose(1, 2, 0), ref)


def test_jpeg_passthrough_is_bit_identical(tmp_path):
    out = convert(DEMO_SLIDE, tmp_path / "demo.zarr", tile=240, shard_tiles=4, progress=False)
    meta = json.loads((Path(out) / "zarr.json").read_text())["attributes"]["slidestream"]
    lv0 = meta["conversion"]["levels"][0]
    assert lv0["mode"] == "passthrough" and lv0["passthrough_tiles"] == 130 and lv0["reencoded_tiles"] == 0
    with (
        wsi.open_slide(DEMO_SLIDE, backend="tiff") as src,
        wsi.open_slide(DEMO_SLIDE, backend="openslide") as osr,
    ):
        b = src._b
        # chunk (ty=2, tx=1) holds the source tile's own JPEG stream
        shard = Path(out) / "0" / "c" / "0" / "0" / "0"
        data = shard.read_bytes()
        index = np.frombuffer(data[-(16 * 16 + 4) : -4], "<u8").reshape(4, 4, 2)
        off, n = (int(v) for v in index[2, 1])
        assert data[off : off + n] == b.raw_jpeg_tile(0, 1, 2)
        # zarr-python itself decodes the chunks to the pixels of the source's decoded tiles
        arr = zarr.open_array(str(Path(out) / "0"), mode="r")
        W, H = src.dimensions
        got = arr[:, :720, :960].transpose(1, 2, 0)
        assert np.array_equal(got, src.read_region((0, 0), 0, (960, 720)))
        assert np.array_equal(got, osr.read_region((0, 0), 0, (960, 720)))
        with wsi.open_slide(out) as z:
            assert np.array_equal(z.read_region((0, 0), 0, (W, H)), osr.read_region((0, 0), 0, (W, H)))


def test_reencoded_and_generated_levels_are_close(tmp_path, pixels):
    src = tmp_path / "s.svs"
    write_tiff_pyramid(src, pixels, tile=128, downsamples=(1, 4))
    out = convert(src, tmp_path / "o.zarr", tile=256, levels=(1, 2, 4), quality=92, progress=False)
    meta = json.loads((Path(out) / "zarr.json").read_text())["attributes"]["slidestream"]
    assert [lv["mode"] for lv in meta["conversion"]["levels"]] == ["reencoded", "generated", "reencoded"]
    with wsi.open_slide(src) as s, wsi.open_slide(out) as z:
        assert z.level_downsamples == (1.0, 2.0, 4.0)
        assert z.level_dimensions == (s.dimensions, (400, 300), s.level_dimensions[1])
        a, b = _level_pixels(z, 0).astype(int), _level_pixels(s, 0).astype(int)
        assert np.abs(a - b).mean() < 2.5  # one JPEG re-encode at q92
        half = wsi.slide.resize_rgb(_level_pixels(s, 0), (400, 300)).astype(int)
        assert np.abs(_level_pixels(z, 1).astype(int) - half).mean() < 4


def test_ngff_metadata(tmp_path):
    out = Path(convert(DEMO_SLIDE, tmp_path / "m.zarr", tile=256, progress=False))
    root = json.loads((out / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    ome = root["attributes"]["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    axes = ms["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"]
    assert [a["type"] for a in axes] == ["channel", "space", "space"]  # NGFF order: channel before space
    assert all(a.get("unit") == "micrometer" for a in axes if a["type"] == "space")
    with wsi.open_slide(DEMO_SLIDE) as src:
        mpp = src.mpp
        props = dict(src.properties)
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]  # 2220x2967 → 2× down to <= 1024 px
    prev = None
    for i, d in enumerate(ms["datasets"]):
        arr = json.loads((out / d["path"] / "zarr.json").read_text())
        assert arr["node_type"] == "array" and arr["data_type"] == "uint8" and arr["shape"][0] == 3
        assert arr["dimension_names"] == ["c", "y", "x"]
        shard = arr["codecs"][0]
        assert shard["name"] == "sharding_indexed" and shard["configuration"]["chunk_shape"] == [3, 256, 256]
        assert shard["configuration"]["codecs"][0]["name"] == "slidestream.jpeg"
        (scale,) = d["coordinateTransformations"]
        assert scale["type"] == "scale" and len(scale["scale"]) == 3
        assert scale["scale"][1] == scale["scale"][2] == pytest.approx(mpp * 2**i)
        if prev is not None:
            assert arr["shape"][2] == prev[2] // 2
        prev = arr["shape"]
    ss = root["attributes"]["slidestream"]
    assert ss["properties"] == props and ss["mpp"] == pytest.approx(mpp) and ss["source"].endswith(".svs")
    assert max(prev[1:]) <= 1024


def test_refuses_to_overwrite(tmp_path):
    dst = tmp_path / "x.zarr"
    convert(DEMO_SLIDE, dst, levels=(1,), codec="none", tile=512, progress=False)
    before = (dst / "zarr.json").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(DEMO_SLIDE, dst, levels=(1,), progress=False)
    assert (dst / "zarr.json").read_bytes() == before
    convert(DEMO_SLIDE, dst, levels=(1, 4), tile=512, overwrite=True, progress=False)
    with wsi.open_slide(dst) as z:
        assert z.level_count == 2
    assert _tmp_leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing(tmp_path, pixels):
    import tifffile

    src = tmp_path / "bad.tif"
    write_tiff_pyramid(
        src, pixels, tile=128, downsamples=(1,), flavor="generic", compression="jpeg", jpeg_rgb=False
    )
    with tifffile.TiffFile(src) as t:
        off, n = t.pages[0].dataoffsets[20], t.pages[0].databytecounts[20]
    data = bytearray(src.read_bytes())
    data[off + 2 : off + n] = b"\x00" * (n - 2)
    src.write_bytes(bytes(data))
    dst = tmp_path / "out.zarr"
    with pytest.raises(UnreadableTileError):
        convert(src, dst, tile=256, progress=False)
    assert not dst.exists() and _tmp_leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_no_destination(tmp_path):
    dst = tmp_path / "int.zarr"
    code = (
        # a suite started in the background (`pytest ... &` from a script) runs with SIGINT ignored,
        # and a child inherits that: restore Python's handler so the signal raises KeyboardInterrupt
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from wsi.convert import convert; "
        f"convert({str(DEMO_SLIDE)!r}, {str(dst)!r}, tile=16, codec='zstd', progress=False)"
    )  # 16 px chunks: ~5 s of writing after the temp store appears, so the signal lands mid-way
    # (with 64 px the conversion could finish before the signal was delivered, and exit 0)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not _tmp_leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "conversion finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt inside convert: temp store removed
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not dst.exists() and _tmp_leftovers(tmp_path) == []


def test_cli_convert(tmp_path, capsys):
    from pipelines.cli import main

    dst = tmp_path / "c.zarr"
    assert (
        main(["convert", str(DEMO_SLIDE), str(dst), "--tile", "240", "--shard-tiles", "8", "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "3 levels" in out and "JPEG pass-through" in out and "level 2: 555x741" in out
    assert main(["convert", str(DEMO_SLIDE), str(dst), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.svs"), str(tmp_path / "m.zarr")]) == 2
    err = capsys.readouterr().err
    assert "missing.svs" in err and "Traceback" not in err
    assert (
        main(
            [
                "convert",
                str(DEMO_SLIDE),
                str(tmp_path / "j.zarr"),
                "--codec",
                "zstd",
                "--levels",
                "1",
                "--no-progress",
                "--json",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["codec"] == "zstd" and rep["levels"][0]["mode"] == "reencoded" and rep["bytes"] > 0
    assert not os.path.exists(tmp_path / "m.zarr")


def test_source_without_mpp(tmp_path, pixels):
    src = tmp_path / "nompp.tif"
    write_tiff_pyramid(src, pixels[:300, :400], tile=128, downsamples=(1, 2), flavor="generic", mpp=None)
    out = Path(convert(src, f"file://{tmp_path / 'n.zarr'}", tile=128, progress=False))
    ms = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert all("unit" not in a for a in ms["axes"])
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]
    with wsi.open_slide(f"file://{out}") as z:
        assert z.mpp is None and z.level_downsamples == (1.0, 2.0)
    with pytest.raises(ValueError, match="local directories"):
        convert(src, "s3://bucket/x.zarr", progress=False)
    given = Path(convert(src, tmp_path / "g.zarr", tile=128, mpp=0.3, progress=False))
    with wsi.open_slide(given) as z:
        assert z.mpp == pytest.approx(0.3) and z.level_mpp(1) == pytest.approx(0.6)
