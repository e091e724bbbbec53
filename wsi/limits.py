"""What a slide's bytes may make us allocate: codec headers checked against the geometry they belong
to, and decompressors bounded to the size that geometry allows.

A tile, strip or chunk has a size the file's directory (or Zarr metadata) declares and that the
backend has already checked against the decode limit. Its encoded stream declares a size of its own
(a JPEG SOF, a JPEG 2000 SIZ, a WebP header) or decompresses to some number of bytes. Nothing may be
allocated from the stream's own claim: the header is read first (a few dozen bytes, no decode) and
must agree with the geometry; a decompressor gets an output buffer of the expected size and fails when
the stream wants more (imagecodecs' ``out=`` argument: zlib, gzip, zstd, blosc, packbits fail; LZW
stops). These checks cost O(header) per tile, not a second decode.

Every function raises :class:`ValueError` (a subclass, :class:`HeaderError`, for header problems)
with a message that says what the stream declares and what was expected; backends wrap it in an
``UnreadableTileError`` naming the file, the level and the tile.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import imagecodecs

#: largest metadata document (zarr.json, .zattrs, .zarray) read whole
MAX_METADATA_BYTES = 16 << 20
#: largest TIFF tag value (tile offsets, ImageDescription, ...) the directory walk accepts
MAX_TAG_BYTES = 256 << 20


class HeaderError(ValueError):
    """An encoded stream's header is missing, malformed or disagrees with the expected geometry."""


# --------------------------------------------------------------------------------------------
# headers
# --------------------------------------------------------------------------------------------
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length field
_JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 except DHT, JPG, DAC


def jpeg_header(data: bytes) -> tuple[int, int, int, int]:
    """(height, width, components, precision) from a JPEG stream's SOF marker, walking the marker
    segments from SOI (each by its length, so the cost is the number of segments before SOF)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise HeaderError("not a JPEG stream (no SOI marker)")
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise HeaderError(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any SOF
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            raise HeaderError(f"JPEG segment of length {length} at byte {i}")
        if marker in _JPEG_SOF:
            if i + 10 > n:
                break
            precision = data[i + 4]
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return h, w, data[i + 9], precision
        i += 2 + length
    raise HeaderError("JPEG stream has no frame header (SOF) before its scan")


def _j2k_siz(data: bytes, start: int) -> tuple[int, int, int, int]:
    if data[start : start + 4] != b"\xff\x4f\xff\x51" or len(data) < start + 42:
        raise HeaderError("JPEG 2000 codestream has no SIZ marker after SOC")
    (_lsiz, _rsiz, xsiz, ysiz, xo, yo, xt, yt, _xto, _yto, csiz) = struct.unpack_from(
        ">HHIIIIIIIIH", data, start + 4
    )
    if xsiz <= xo or ysiz <= yo or xt == 0 or yt == 0 or csiz == 0:
        raise HeaderError(f"JPEG 2000 SIZ declares an empty image or tiles ({xsiz - xo}x{ysiz - yo})")
    comps = data[start + 42 : start + 42 + 3 * csiz]
    if len(comps) < 3 * csiz:
        raise HeaderError("JPEG 2000 SIZ is truncated")
    precision = max((comps[3 * k] & 0x7F) + 1 for k in range(csiz))
    if any(comps[3 * k + 1] == 0 or comps[3 * k + 2] == 0 for k in range(csiz)):
        raise HeaderError("JPEG 2000 SIZ declares a component subsampling of 0")
    return ysiz - yo, xsiz - xo, csiz, precision


def j2k_header(data: bytes) -> tuple[int, int, int, int]:
    """(height, width, components, largest precision) from a JPEG 2000 codestream's SIZ marker, or
    from the codestream box (``jp2c``) of a JP2 file."""
    if data[:4] == b"\xff\x4f\xff\x51":
        return _j2k_siz(data, 0)
    i, n = 0, len(data)
    for _ in range(64):  # top-level boxes of a JP2 file; the codestream is among the first few
        if i + 8 > n:
            break
        length, kind = struct.unpack_from(">I4s", data, i)
        head = 8
        if length == 1:
            if i + 16 > n:
                break
            length, head = struct.unpack_from(">Q", data, i + 8)[0], 16
        if kind == b"jp2c":
            return _j2k_siz(data, i + head)
        if length == 0 or length < head:
            break
        i += length
    raise HeaderError("not a JPEG 2000 codestream or JP2 file (no SIZ marker found)")


def webp_header(data: bytes) -> tuple[int, int]:
    """(height, width) of a WebP image from its RIFF header (VP8, VP8L or VP8X chunk)."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise HeaderError("not a WebP stream (no RIFF/WEBP header)")
    kind = data[12:16]
    if kind == b"VP8X":
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return h, w
    if kind == b"VP8L":
        if data[20] != 0x2F:
            raise HeaderError("WebP lossless stream without its signature byte")
        bits = int.from_bytes(data[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise HeaderError("WebP lossy stream without its start code")
        w = int.from_bytes(data[26:28], "little") & 0x3FFF
        h = int.from_bytes(data[28:30], "little") & 0x3FFF
        return h, w
    raise HeaderError(f"WebP stream with unknown first chunk {kind!r}")


def image_header(codec: str, data: bytes) -> tuple[int, int, int | None]:
    """(height, width, components or None) that the ``codec`` ("jpeg", "jpeg2000", "webp") stream
    declares."""
    if codec == "jpeg":
        h, w, c, precision = jpeg_header(data)
        if precision != 8:
            raise HeaderError(f"JPEG stream of {precision}-bit samples; 8-bit expected")
        return h, w, c
    if codec == "jpeg2000":
        h, w, c, precision = j2k_header(data)
        if precision > 16:
            raise HeaderError(f"JPEG 2000 stream of {precision}-bit samples")
        return h, w, c
    if codec == "webp":
        h, w = webp_header(data)
        return h, w, None
    raise ValueError(f"no header check for codec {codec!r}")


def check_image(
    codec: str, data: bytes, width: int, rows: tuple[int, int], components: tuple[int, ...] | None = None
) -> None:
    """Raise :class:`HeaderError` unless the stream declares exactly ``width`` columns, between
    ``rows[0]`` and ``rows[1]`` rows (a TIFF strip may be coded short or padded) and, when given, one
    of ``components``."""
    h, w, c = image_header(codec, data)
    if w != width or not rows[0] <= h <= rows[1]:
        want = f"{width}x{rows[1]}" if rows[0] == rows[1] else f"{width}x({rows[0]}..{rows[1]})"
        raise HeaderError(f"{codec} stream declares {w}x{h} pixels but the tile is {want}")
    if components is not None and c is not None and c not in components:
        raise HeaderError(
            f"{codec} stream declares {c} components, expected {' or '.join(map(str, components))}"
        )


# --------------------------------------------------------------------------------------------
# decompression
# --------------------------------------------------------------------------------------------
_DECOMPRESS: dict[str, Callable] = {
    "deflate": imagecodecs.zlib_decode,
    "zlib": imagecodecs.zlib_decode,
    "gzip": imagecodecs.gzip_decode,
    "zstd": imagecodecs.zstd_decode,
    "blosc": imagecodecs.blosc_decode,
    "lzw": imagecodecs.lzw_decode,
    "packbits": imagecodecs.packbits_decode,
}
BOUNDED_CODECS = frozenset(_DECOMPRESS) | {"none"}


def decompress(codec: str, data: bytes, nbytes: int) -> bytes:
    """Decompress ``data`` into at most ``nbytes`` bytes; raises ``ValueError`` when the stream
    would produce more (a decompression bomb never allocates beyond ``nbytes``) or is damaged. The
    result may be shorter than ``nbytes``: callers check the size they need."""
    if codec == "none":
        return data
    try:
        f = _DECOMPRESS[codec]
    except KeyError:
        raise ValueError(f"no bounded decompressor for {codec!r}") from None
    try:
        return f(data, out=nbytes)
    except (RuntimeError, ValueError) as e:  # imagecodecs' *Error classes derive from RuntimeError
        raise ValueError(f"{codec} stream does not decompress into the expected {nbytes} bytes ({e})") from e


# --------------------------------------------------------------------------------------------
# zarr codecs
# --------------------------------------------------------------------------------------------
_ZARR_COMPRESSORS = {"zstd": "zstd", "gzip": "gzip", "zlib": "zlib", "blosc": "blosc"}
#: numcodecs filters that do not expand their input beyond its dtype ratio (v2 ``filters``)
SAFE_V2_FILTERS = frozenset({"delta", "shuffle", "bitround"})


def strip_crc32c(data: bytes, _max: int = 0) -> bytes:
    """Check and remove a trailing little-endian crc32c (zarr's ``crc32c`` codec)."""
    import google_crc32c

    if len(data) < 4:
        raise ValueError("chunk shorter than its crc32c checksum")
    body, crc = data[:-4], int.from_bytes(data[-4:], "little")
    if google_crc32c.value(body) != crc:
        raise ValueError("crc32c checksum mismatch")
    return body


def zarr_bytes_step(name: str | None) -> Callable[[bytes, int], bytes] | None:
    """A bounded decoder ``(data, max_bytes) -> bytes`` for the zarr bytes→bytes codec ``name`` (a
    v3 codec name or a v2 numcodecs id, with or without the ``numcodecs.`` prefix), or None when
    slidestream has none (the codec then cannot be read with bounded memory)."""
    name = str(name or "").removeprefix("numcodecs.")
    codec = _ZARR_COMPRESSORS.get(name)
    if codec is not None:
        return lambda data, n: decompress(codec, data, n)
    if name == "crc32c":
        return strip_crc32c
    return None


def output_bound(nbytes: int) -> int:
    """Most bytes one step of a bytes→bytes codec chain may produce for a chunk of ``nbytes``
    decoded bytes (a compressed intermediate may be slightly larger than its input)."""
    return nbytes + (nbytes >> 3) + (1 << 16)
