"""Every broken or negative file gives its documented error class through ``open_slide`` (auto),
with a message naming the file — never a crash, a hang or blank pixels."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import DEMO_SLIDE
from conftest import testdata as _testdata

import wsi
from wsi.errors import (
    CorruptSlideError,
    DecodeLimitError,
    MissingMppError,
    SlideError,
    UnreadableTileError,
    UnsupportedSlideError,
)
from wsi.synth import mirror_tile, write_tiff_pyramid

pytestmark = pytest.mark.timeout(30)

# (file, error on open or None, error on reading pixels or None)
# unopenable.tiff: the TIFF backend refuses compression 52479 (UnsupportedSlideError), auto falls back
# to OpenSlide, which recognises a generic TIFF and then refuses the compression: UnsupportedSlideError.
# The JPEG-LS DICOM is refused the same way (unsupported transfer syntax). The 16-bit DICOM and the
# truncated MIRAX/VMS files are detected by OpenSlide and fail while opening: CorruptSlideError.
BROKEN = [
    ("openslide-python/unreadable.svs", None, UnreadableTileError),
    ("openslide-python/unopenable.tiff", UnsupportedSlideError, None),
    ("histolab/broken.svs", UnsupportedSlideError, None),
    ("openslide-python/boxes.png", UnsupportedSlideError, None),
    ("highdicom/sm_image_jpegls.dcm", UnsupportedSlideError, None),
    ("highdicom/sm_image_grayscale.dcm", CorruptSlideError, None),
    ("rse-panimg/Mirax2-Fluorescence-1.mrxs", CorruptSlideError, None),
    ("rse-panimg/Hamamatsu-VMS/CMU-1-40x - 2010-01-12 13.24.05.vms", CorruptSlideError, None),
]


@pytest.mark.parametrize("rel,open_err,read_err", BROKEN, ids=[b[0].split("/")[-1] for b in BROKEN])
def test_broken_file_gives_documented_error(rel, open_err, read_err):
    path = _testdata(rel)
    if open_err is not None:
        with pytest.raises(open_err) as ei:
            wsi.open_slide(path)
        assert str(path) in str(ei.value)
        return
    with wsi.open_slide(path) as s:
        with pytest.raises(read_err) as ei:
            s.read_region((0, 0), 0, s.dimensions)
        msg = str(ei.value)
        assert str(path) in msg and "level 0" in msg and "tile 0" in msg


def test_unknown_compression_refused_by_tiff_backend():
    path = _testdata("openslide-python/unopenable.tiff")
    with pytest.raises(UnsupportedSlideError, match="52479"):
        wsi.open_slide(path, backend="tiff")


def test_missing_mpp():
    path = _testdata("histolab/tcga-cr-7395-01a-01-ts1.svs")
    with wsi.open_slide(path) as s:
        assert s.mpp is None
        with pytest.raises(MissingMppError, match="tcga-cr-7395"):
            s.read_region_mpp((0, 0), (64, 64), 1.0)
    with wsi.open_slide(path, mpp=0.25) as s:
        assert s.read_region_mpp((0, 0), (32, 32), 0.5).shape == (32, 32, 3)


@pytest.fixture(scope="module")
def small_svs(tmp_path_factory):
    from wsi.synth import load_demo_pixels

    img = mirror_tile(load_demo_pixels(DEMO_SLIDE)[:512, :512], (512, 384))
    p = tmp_path_factory.mktemp("broken") / "ok.svs"
    write_tiff_pyramid(p, img, tile=128, downsamples=(1, 4), associated=False)
    return p


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.98])
def test_truncated_tiff(small_svs, tmp_path, fraction):
    data = small_svs.read_bytes()
    p = tmp_path / "truncated.svs"
    p.write_bytes(data[: int(len(data) * fraction)])
    try:
        s = wsi.open_slide(p)
    except (CorruptSlideError, UnsupportedSlideError) as e:
        assert str(p) in str(e)
        return
    with s, pytest.raises((UnreadableTileError, CorruptSlideError)) as ei:
        s.read_region((0, 0), 0, s.dimensions)
    assert str(p) in str(ei.value)


def test_corrupt_tile_raises_not_blank(small_svs, tmp_path):
    from wsi.backends.tiff import TiffBackend

    b = TiffBackend(str(small_svs))
    off, n = b._tables[0][0][5], b._tables[0][1][5]
    b.close()
    data = bytearray(small_svs.read_bytes())
    data[off + 2 : off + n] = b"\x00" * (n - 2)  # keep SOI, destroy the rest of tile 5
    p = tmp_path / "corrupt_tile.svs"
    p.write_bytes(bytes(data))
    with wsi.open_slide(p) as s:
        ok = s.read_region((0, 0), 0, (128, 128))  # tile 0 is intact
        assert ok.std() > 0
        with pytest.raises(UnreadableTileError, match=r"level 0 tile 5 \(column 1, row 1"):
            s.read_region((130, 130), 0, (50, 50))
        with pytest.raises(UnreadableTileError):
            s.read_regions([(128, 128)], 0, (128, 128), threads=2)


def _patch_short_tag(data: bytearray, tag: int, value: int) -> None:
    """Set a SHORT/LONG tag of IFD 0 of a little-endian classic TIFF in place."""
    ifd = struct.unpack_from("<I", data, 4)[0]
    n = struct.unpack_from("<H", data, ifd)[0]
    for k in range(n):
        e = ifd + 2 + 12 * k
        t, typ = struct.unpack_from("<HH", data, e)
        if t == tag:
            struct.pack_into("<H" if typ == 3 else "<I", data, e + 8, value)
            return
    raise KeyError(tag)


def test_huge_declared_tile_hits_decode_limit(tmp_path):
    import tifffile

    p = tmp_path / "huge.tif"
    tifffile.imwrite(
        p,
        np.full((256, 256, 3), 200, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        metadata=None,
    )
    data = bytearray(p.read_bytes())
    _patch_short_tag(data, 322, 65520)  # TileWidth
    _patch_short_tag(data, 323, 65520)  # TileLength: one tile now decodes to 12 GiB
    p.write_bytes(bytes(data))
    with pytest.raises(DecodeLimitError, match="decode limit") as ei:
        wsi.open_slide(p)
    assert str(p) in str(ei.value)
    # a lower limit refuses an honest file too, before anything is allocated
    q = tmp_path / "big_tiles.tif"
    tifffile.imwrite(
        q, np.full((256, 256, 3), 200, np.uint8), tile=(256, 256), photometric="rgb", metadata=None
    )
    with pytest.raises(DecodeLimitError):
        wsi.open_slide(q, decode_limit=64 * 1024)
    with wsi.open_slide(q) as s:
        assert (s.read_region((0, 0), 0, (256, 256)) == 200).all()


def test_not_a_tiff_with_tiff_backend(tmp_path):
    p = tmp_path / "fake.tif"
    p.write_bytes(b"hello, this is not a slide" * 10)
    with pytest.raises(UnsupportedSlideError, match="not a TIFF"):
        wsi.open_slide(p, backend="tiff")
    with pytest.raises(SlideError):
        wsi.open_slide(p)
    with pytest.raises(FileNotFoundError):
        wsi.open_slide(tmp_path / "missing.svs")
