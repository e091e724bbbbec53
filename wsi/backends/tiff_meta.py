"""TIFF directory parsing for the byte-range backend: pyramid levels, tile tables, mpp, properties.

The directory is parsed once with tifffile (through the I/O core's file object, so a remote slide
costs a few small ranged reads), after :func:`wsi.backends.tiff_ifd.check_ifd_chain` has walked it. Only plain numbers, byte strings and numpy arrays are kept: the
``TiffFile`` is closed before the backend is used, so nothing tifffile-owned is shared between
threads.
"""

from __future__ import annotations

import math
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptSlideError, DecodeLimitError, UnsupportedSlideError

#: TIFF compression tag -> our name; anything else is refused when the slide is opened
COMPRESSIONS: dict[int, str] = {
    1: "none",
    5: "lzw",
    7: "jpeg",
    8: "deflate",
    32946: "deflate",
    32773: "packbits",
    33003: "jpeg2000",  # Aperio JPEG 2000, YCbCr
    33005: "jpeg2000",  # Aperio JPEG 2000, RGB
    34712: "jpeg2000",
    50000: "zstd",
    34926: "zstd",
    50001: "webp",
    34927: "webp",
}

_PHOTOMETRIC_OK = {0, 1, 2, 3, 6}  # miniswhite, minisblack, rgb, palette, ycbcr (JPEG only)


@dataclass(slots=True)
class LevelInfo:
    """Everything needed to fetch and decode the tiles (or strips) of one image directory."""

    width: int
    height: int
    tile_w: int  # strips: the image width
    tile_h: int  # strips: rows per strip
    nx: int
    ny: int
    tiled: bool
    offsets: np.ndarray  # (planes, ny * nx) int64
    counts: np.ndarray  # (planes, ny * nx) int64
    compression: int
    jpegtables: bytes | None
    photometric: int
    planar: int
    predictor: int
    bits: int
    spp: int
    dtype: np.dtype  # one sample, with the file's byte order
    colormap: np.ndarray | None
    jpeg_colorspace: int | None  # imagecodecs ``colorspace`` for JPEG tiles (2 = RGB-coded)
    jpeg_outcolorspace: int | None
    page: str  # where the directory is, for messages ("page 0", "page 0 subifd 1")

    @property
    def codec(self) -> str:
        return COMPRESSIONS[self.compression]

    def rows_in(self, ty: int) -> int:
        """Rows a tile/strip row stores (a strip image's last strip may be shorter)."""
        if self.tiled:
            return self.tile_h
        return min(self.tile_h, self.height - ty * self.tile_h)


@dataclass(slots=True)
class ParsedTiff:
    vendor: str
    levels: list[LevelInfo]
    associated: dict[str, LevelInfo]
    properties: dict[str, str]
    mpp: float | None


def _positive(v: float | None) -> float | None:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _tag(page, name: str, default=None):
    t = page.tags.get(name)
    return default if t is None else t.value


_MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, struct.error)


def _level_from_page(page, url: str, where: str, decode_limit: int, head: bytes | None) -> LevelInfo:
    """Validate one tifffile page and copy out what reading needs (no tifffile objects kept).

    Geometry is checked before codec support: a page that is both oversized (or damaged) and in an
    unsupported encoding raises ``DecodeLimitError`` (``CorruptSlideError``), never the
    ``UnsupportedSlideError`` that would hand the file to OpenSlide. A tag of the wrong type or
    shape is a ``CorruptSlideError`` naming the file and the page."""
    try:
        return _level(page, url, where, decode_limit, head)
    except _MALFORMED as e:
        raise CorruptSlideError(
            f"{url}: {where} has a malformed tag ({type(e).__name__}: {e}); the TIFF directory is damaged",
            url,
        ) from e


def _level(page, url: str, where: str, decode_limit: int, head: bytes | None) -> LevelInfo:
    width, height = int(page.imagewidth), int(page.imagelength)
    if width <= 0 or height <= 0:
        raise CorruptSlideError(f"{url}: {where} declares an empty image {width}x{height}", url)
    spp = int(page.samplesperpixel)
    bits = int(page.bitspersample)
    planar = int(page.planarconfig)
    if spp <= 0 or bits <= 0:
        raise CorruptSlideError(f"{url}: {where} declares {spp} samples of {bits} bits", url)
    tiled = bool(page.is_tiled)
    if tiled:
        tw, th = int(page.tilewidth), int(page.tilelength)
    else:
        tw, th = width, min(int(page.rowsperstrip or height), height)
    if tw <= 0 or th <= 0:
        raise CorruptSlideError(f"{url}: {where} declares tiles of {tw}x{th} pixels", url)
    nbytes = tw * th * spp * -(-bits // 8)
    if nbytes > decode_limit:
        raise DecodeLimitError(
            f"{url}: {where} declares {'tiles' if tiled else 'strips'} of {tw}x{th}x{spp} samples "
            f"({nbytes / 2**20:.0f} MiB decoded), above the decode limit of {decode_limit / 2**20:.0f} MiB; "
            f"raise decode_limit= if you trust this file",
            url,
        )
    nx, ny = -(-width // tw), -(-height // th)
    planes = spp if planar == 2 else 1
    offsets = np.asarray(page.dataoffsets, dtype=np.int64).ravel()
    counts = np.asarray(page.databytecounts, dtype=np.int64).ravel()
    if offsets.size != nx * ny * planes or counts.size != offsets.size:
        raise CorruptSlideError(
            f"{url}: {where} has {offsets.size} tile offsets and {counts.size} byte counts for a grid "
            f"of {nx}x{ny}x{planes}; the TIFF directory is damaged",
            url,
        )
    if counts.size and (int(counts.min()) < 0 or int(offsets.min()) < 0):
        raise CorruptSlideError(f"{url}: {where} has negative tile offsets or byte counts", url)
    # an encoded tile is at most about its decoded size (plus room for JPEG markers and profiles)
    max_count = min(decode_limit, 2 * nbytes + (1 << 20))
    if counts.size and int(counts.max()) > max_count:
        raise DecodeLimitError(
            f"{url}: {where} declares a tile of {int(counts.max())} encoded bytes for {nbytes} decoded bytes "
            f"(at most {max_count} allowed); the file is damaged",
            url,
        )
    comp = int(page.compression)
    if comp not in COMPRESSIONS:
        raise UnsupportedSlideError(
            f"{url}: {where} uses TIFF compression {comp}, which slidestream cannot decode; "
            f"re-export the slide with JPEG, JPEG 2000, LZW, deflate or zstd (or try backend='openslide')",
            url,
        )
    photometric = int(page.photometric)
    if photometric not in _PHOTOMETRIC_OK or (photometric == 6 and comp != 7):
        raise UnsupportedSlideError(
            f"{url}: {where} has photometric interpretation {photometric} with compression {comp}; "
            f"only RGB, grayscale and palette images are supported — convert the slide to RGB",
            url,
        )
    if bits not in (8, 16) or int(page.sampleformat) != 1 or (photometric == 3 and bits != 8):
        raise UnsupportedSlideError(
            f"{url}: {where} stores {bits}-bit samples of format {int(page.sampleformat)}; "
            f"only unsigned 8/16-bit images are supported",
            url,
        )
    if spp > 4 or (photometric in (2, 6) and spp < 3):
        raise UnsupportedSlideError(
            f"{url}: {where} has {spp} samples per pixel with photometric interpretation {photometric}; "
            f"only gray, RGB and RGBA images are supported",
            url,
        )
    if int(getattr(page, "imagedepth", 1)) > 1:
        raise UnsupportedSlideError(f"{url}: {where} is a volumetric TIFF (ImageDepth > 1)", url)
    predictor = int(page.predictor)
    if predictor not in (1, 2):
        raise UnsupportedSlideError(
            f"{url}: {where} uses TIFF predictor {predictor}; only 1 and 2 are supported", url
        )
    jpegtables = page.jpegtables if comp == 7 else None
    if jpegtables is not None and not isinstance(jpegtables, bytes):
        raise CorruptSlideError(f"{url}: {where} has a JPEGTables tag that is not a byte string", url)
    cs = ocs = None
    if comp == 7:
        jfif = head is not None and (b"JFIF" in head[:64])
        adobe = head is not None and head.find(b"Adobe") >= 0
        if photometric == 2 and not jfif and not adobe:
            cs, ocs = 2, 2  # Aperio "JPEG/RGB": RGB-coded stream with no colour marker
        elif photometric in (2, 6):
            ocs = 2
    colormap = None
    if photometric == 3:
        cm = page.colormap
        if cm is None:
            raise CorruptSlideError(f"{url}: {where} is a palette image without a colour map", url)
        cm = np.asarray(cm)
        if cm.ndim != 2 or cm.shape[0] != 3 or cm.shape[1] < 256:
            raise CorruptSlideError(f"{url}: {where} has a colour map of shape {cm.shape}", url)
        cm = cm[:, :256]
        colormap = (cm >> 8).astype(np.uint8).T.copy() if cm.max() > 255 else cm.astype(np.uint8).T.copy()
    dtype = np.dtype(f"{page.parent.byteorder}u{bits // 8}")
    return LevelInfo(
        width,
        height,
        tw,
        th,
        nx,
        ny,
        tiled,
        offsets.reshape(planes, nx * ny),
        counts.reshape(planes, nx * ny),
        comp,
        jpegtables,
        photometric,
        planar,
        predictor,
        bits,
        spp,
        dtype,
        colormap,
        cs,
        ocs,
        where,
    )


def _generic_pages(tf) -> list:
    """Levels of a generic TIFF the way OpenSlide finds them: the top-level directories shaped like
    the first one (tiled if it is tiled, same samples), largest first, one per size. Non-integer
    downsamples are fine (tifffile's own pyramid detection wants integer factors)."""
    first = tf.pages.first
    key = (first.is_tiled, first.samplesperpixel, first.photometric)
    seen, out = set(), []
    for page in tf.pages:
        page = page if hasattr(page, "is_tiled") else page.aspage()
        if (page.is_tiled, page.samplesperpixel, page.photometric) != key:
            continue
        size = (page.imagewidth, page.imagelength)
        if size not in seen and page.imagewidth <= first.imagewidth and page.imagelength <= first.imagelength:
            seen.add(size)
            out.append(page)
    out.sort(key=lambda p: (-p.imagewidth, -p.imagelength))
    return out


def _page_where(page) -> str:
    idx = page.index
    if isinstance(idx, tuple):
        return "page " + " subifd ".join(str(i) for i in idx)
    return f"page {idx}"


def _first_tile_head(fh, page) -> bytes | None:
    """The first bytes of the first non-empty JPEG tile (to see JFIF/Adobe colour markers)."""
    if int(page.compression) != 7:
        return None
    for off, n in zip(page.dataoffsets, page.databytecounts):
        if n > 0:
            fh.seek(off)
            return fh.read(min(int(n), 256))
    return None


def parse_aperio_description(desc: str) -> dict[str, str]:
    """``aperio.*`` properties from an Aperio ImageDescription (``|key = value|...``)."""
    props: dict[str, str] = {}
    parts = desc.split("|")
    for part in parts[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            k = k.strip()
            if k:
                props[f"aperio.{k}"] = v.strip()
    if parts:
        header = parts[0].splitlines()
        if header:
            props["aperio.Header"] = header[-1].strip() if len(header) > 1 else header[0].strip()
    return props


_UNIT_UM = {
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "μm": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
}


def ome_mpp(xml: str) -> tuple[float | None, float | None]:
    """(mpp_x, mpp_y) of the first OME Image's Pixels, in µm/px (None when absent/nonsense)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    for el in root.iter():
        if el.tag.endswith("}Pixels") or el.tag == "Pixels":
            out = []
            for ax in ("X", "Y"):
                v = _positive(el.get(f"PhysicalSize{ax}"))
                unit = el.get(f"PhysicalSize{ax}Unit", "µm")
                out.append(v * _UNIT_UM[unit] if v is not None and unit in _UNIT_UM else None)
            return out[0], out[1]
    return None, None


def resolution_mpp(page) -> tuple[float | None, float | None]:
    """µm/px from X/YResolution + ResolutionUnit (inch or centimetre; unit NONE gives no mpp)."""
    unit = int(_tag(page, "ResolutionUnit", 2))
    per_unit_um = {2: 25400.0, 3: 10000.0}.get(unit)
    if per_unit_um is None:
        return None, None
    out = []
    for name in ("XResolution", "YResolution"):
        v = _tag(page, name)
        try:
            px_per_unit = v[0] / v[1] if isinstance(v, tuple) else float(v)
        except (TypeError, ZeroDivisionError, ValueError, IndexError):
            px_per_unit = None
        px_per_unit = _positive(px_per_unit)
        out.append(_positive(per_unit_um / px_per_unit) if px_per_unit else None)
    return out[0], out[1]


_TIFF_PROPS = (
    "ImageDescription",
    "Software",
    "Make",
    "Model",
    "DateTime",
    "Artist",
    "HostComputer",
    "Copyright",
    "DocumentName",
)


def parse_tiff(fh, url: str, decode_limit: int, file_size: int | None) -> ParsedTiff:
    """Parse the TIFF directory from the open binary file ``fh`` (whose directory chain
    :func:`wsi.backends.tiff_ifd.check_ifd_chain` has walked). Whatever tifffile raises on a
    malformed directory becomes a ``CorruptSlideError`` naming the file."""
    import tifffile

    try:
        return _parse(tifffile, fh, url, decode_limit, file_size)
    except (tifffile.TiffFileError, EOFError, RuntimeError, *_MALFORMED) as e:
        # RuntimeError: tifffile's own consistency checks ("incompatible keyframe", ...)
        if "not a TIFF" in str(e):
            raise UnsupportedSlideError(f"{url}: not a TIFF file ({e})", url) from e
        raise CorruptSlideError(
            f"{url}: the TIFF directory cannot be parsed ({type(e).__name__}: {e}); the file is damaged", url
        ) from e


def _parse(tifffile, fh, url: str, decode_limit: int, file_size: int | None) -> ParsedTiff:
    tf = tifffile.TiffFile(fh)
    with tf:
        series = tf.series
        if not series:
            raise CorruptSlideError(f"{url}: the TIFF file holds no image", url)
        vendor = "aperio" if tf.is_svs else "ome" if tf.is_ome else "generic-tiff"
        main = series[0]
        if tf.is_ome and main.levels and len(main.levels[0].pages) > 1:
            raise UnsupportedSlideError(
                f"{url}: OME-TIFF with {len(main.levels[0].pages)} planes per level (channels/z/time); "
                f"slidestream reads RGB or single-plane OME-TIFF only",
                url,
            )
        if vendor == "generic-tiff" and not tf.pages.first.subifds:
            pages = _generic_pages(tf)
        else:
            pages = []
            for lvl in main.levels:
                page = lvl.keyframe if lvl.keyframe is not None else lvl.pages[0]
                if not isinstance(page, tifffile.TiffPage):
                    page = page.aspage()
                pages.append(page)
        levels = []
        unsupported: UnsupportedSlideError | None = None
        for page in pages:
            # every level's geometry is checked before an unsupported encoding is reported: a file
            # refused as damaged or oversized must never be handed on to OpenSlide
            try:
                head = _first_tile_head(tf.filehandle, page)
                levels.append(_level_from_page(page, url, _page_where(page), decode_limit, head))
            except UnsupportedSlideError as e:
                unsupported = unsupported or e
        if unsupported is not None:
            raise unsupported
        if not levels:
            raise CorruptSlideError(f"{url}: the TIFF file holds no image", url)
        for a, b in zip(levels, levels[1:]):
            if b.width > a.width or b.height > a.height:
                raise UnsupportedSlideError(
                    f"{url}: pyramid levels are not ordered by size ({a.page}, {b.page})", url
                )
        associated: dict[str, LevelInfo] = {}
        if vendor == "aperio":
            for s in series[1:]:
                name = (s.name or "").lower()
                if name in ("thumbnail", "label", "macro") and s.keyframe is not None:
                    try:
                        associated[name] = _level_from_page(
                            s.keyframe,
                            url,
                            _page_where(s.keyframe),
                            decode_limit,
                            _first_tile_head(tf.filehandle, s.keyframe),
                        )
                    except (UnsupportedSlideError, DecodeLimitError, CorruptSlideError):
                        continue  # an unreadable label does not make the slide unreadable
        page0 = pages[0]
        desc = page0.description or ""
        props: dict[str, str] = {"openslide.vendor": vendor}
        for name in _TIFF_PROPS:
            v = _tag(page0, name)
            if isinstance(v, str) and v:
                props[f"tiff.{name}"] = v
        unit = _tag(page0, "ResolutionUnit")
        if unit is not None:
            props["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(
                int(unit), str(int(unit))
            )
        mpp_x = mpp_y = None
        if vendor == "aperio":
            props.update(parse_aperio_description(desc))
            mpp_x = mpp_y = _positive(props.get("aperio.MPP"))
            if _positive(props.get("aperio.AppMag")):
                props["openslide.objective-power"] = props["aperio.AppMag"]
        elif vendor == "ome":
            mpp_x, mpp_y = ome_mpp(tf.ome_metadata or "")
        else:
            mpp_x, mpp_y = resolution_mpp(page0)
        if mpp_x is not None and mpp_y is None:
            mpp_y = mpp_x
        if mpp_x is not None:
            props["openslide.mpp-x"] = repr(mpp_x)
            props["openslide.mpp-y"] = repr(mpp_y)
    for lv in [*levels, *associated.values()]:
        ends = lv.offsets + lv.counts
        past_eof = file_size is not None and int(ends.max(initial=0)) > file_size
        if lv.counts.size and (past_eof or int(lv.offsets.min()) < 0):
            raise CorruptSlideError(
                f"{url}: {lv.page} points at bytes up to {int(ends.max())} but the file has {file_size} "
                f"bytes; the file is truncated — copy it again",
                url,
            )
    w0, h0 = levels[0].width, levels[0].height
    props["openslide.level-count"] = str(len(levels))
    for i, lv in enumerate(levels):
        props[f"openslide.level[{i}].width"] = str(lv.width)
        props[f"openslide.level[{i}].height"] = str(lv.height)
        props[f"openslide.level[{i}].downsample"] = repr((w0 / lv.width + h0 / lv.height) / 2)
        props[f"openslide.level[{i}].tile-width"] = str(lv.tile_w)
        props[f"openslide.level[{i}].tile-height"] = str(lv.tile_h)
    return ParsedTiff(vendor, levels, associated, props, mpp_x)
