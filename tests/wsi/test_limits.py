"""wsi.limits: codec headers read without decoding (JPEG SOF, JPEG 2000 SIZ in codestreams and JP2
files, WebP VP8/VP8L/VP8X) agree with what imagecodecs decodes, and decompressors never produce
more than they are allowed."""

from __future__ import annotations

import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile

import wsi
from wsi.errors import UnreadableTileError
from wsi.limits import (
    HeaderError,
    check_image,
    decompress,
    image_header,
    j2k_header,
    jpeg_header,
    webp_header,
)


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)


def test_headers_agree_with_decoders(img):
    streams = {
        "jpeg": imagecodecs.jpeg8_encode(img),
        "jpeg2000": imagecodecs.jpeg2k_encode(img, codecformat="j2k"),
        "jp2": imagecodecs.jpeg2k_encode(img, codecformat="jp2"),
        "webp lossy": imagecodecs.webp_encode(img, level=80),
        "webp lossless": imagecodecs.webp_encode(img, lossless=True),
    }
    for name, data in streams.items():
        codec = name.split()[0].replace("jp2", "jpeg2000")
        decode = {
            "jpeg": imagecodecs.jpeg8_decode,
            "jpeg2000": imagecodecs.jpeg2k_decode,
            "webp": imagecodecs.webp_decode,
        }
        h, w, c = image_header(codec, bytes(data))
        assert (h, w) == decode[codec](data).shape[:2] == (48, 80), name
        assert c in (None, 3)
        check_image(codec, bytes(data), 80, (48, 48), (3,) if c else None)
        with pytest.raises(HeaderError, match="declares 80x48"):
            check_image(codec, bytes(data), 64, (48, 48))
    with pytest.raises(HeaderError):
        jpeg_header(b"\xff\xd8\xff\xda\x00\x02")  # scan before any frame header
    for bad in (b"", b"\x00" * 40, b"RIFF\x00\x00\x00\x00WEBPXXXX" + bytes(20)):
        with pytest.raises(HeaderError):
            webp_header(bad)
        with pytest.raises(HeaderError):
            j2k_header(bad)


@pytest.mark.parametrize("codec", ["deflate", "gzip", "zstd", "blosc", "lzw", "packbits"])
def test_decompressors_are_bounded(codec):
    raw = np.arange(4096, dtype=np.uint8).tobytes()
    enc = {
        "deflate": zlib.compress,
        "gzip": imagecodecs.gzip_encode,
        "zstd": imagecodecs.zstd_encode,
        "blosc": imagecodecs.blosc_encode,
        "lzw": imagecodecs.lzw_encode,
        "packbits": imagecodecs.packbits_encode,
    }[codec]
    assert bytes(decompress(codec, bytes(enc(raw)), 4096)) == raw
    if codec == "packbits":  # each 0x81 0x00 pair is a run of 128 zeros (imagecodecs' encoder is slow)
        bomb = b"\x81\x00" * (1 << 15)
    else:
        bomb = bytes(enc(bytes(4 << 20)))  # 4 MiB of zeros: 1000 times the bound
    try:
        out = decompress(codec, bomb, 4096)
    except ValueError as e:
        assert "4096" in str(e)
    else:
        assert codec == "lzw" and len(out) == 4096  # LZW stops at the bound instead of failing


def test_webp_tiles_are_checked_against_the_tile(tmp_path, img):
    p = tmp_path / "webp.tif"
    tile = np.ascontiguousarray(np.tile(img, (3, 2, 1))[:128, :128])
    tifffile.imwrite(
        p,
        np.tile(tile, (2, 2, 1)),
        tile=(128, 128),
        photometric="rgb",
        compression="webp",
        compressionargs={"lossless": True},
        metadata=None,
    )
    with wsi.open_slide(p) as s:
        assert np.array_equal(s.read_region((0, 0), 0, (256, 256)), np.tile(tile, (2, 2, 1)))
    data = bytearray(p.read_bytes())
    with tifffile.TiffFile(p) as tf:
        off = tf.pages[0].dataoffsets[3]
    i = data.index(b"VP8L", off)
    bits = int.from_bytes(data[i + 9 : i + 13], "little")
    bits = (bits & ~0x3FFF) | (4095 & 0x3FFF)  # width 4096
    data[i + 9 : i + 13] = bits.to_bytes(4, "little")
    p.write_bytes(bytes(data))
    with wsi.open_slide(p) as s:
        with pytest.raises(UnreadableTileError, match="declares 4096x128"):
            s.read_region((128, 128), 0, (128, 128))
        assert np.array_equal(s.read_region((0, 0), 0, (128, 128)), tile)
