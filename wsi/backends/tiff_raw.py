"""The raw-tiles capability of the TIFF backend (:class:`wsi.backends.base.RawTiles`): a level's
encoded tiles as stored, and JPEG tiles as standalone streams (JPEGTables merged in; RGB-coded
tiles get an Adobe APP14 transform=0 marker, so any standard decoder — libjpeg, simplejpeg,
torchvision on CPU — returns the right colours). ``convert`` copies them into Zarr chunks; the
scaled and the GPU decode decode them."""

from __future__ import annotations

from ..errors import UnreadableTileError

# Adobe APP14 marker, transform 0: tells any JPEG decoder the 3 components are RGB, not YCbCr
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class TiffRawTiles:
    """Mixin of :class:`wsi.backends.tiff.TiffBackend` (uses its ``_levels``, ``_tables``, ``_get``,
    ``_getter``, ``_fd``, ``_prefix`` and ``url``)."""

    def tile_grid(self, level: int) -> tuple[int, int, int, int]:
        """(tile_w, tile_h, n_tiles_x, n_tiles_y) of a level (strips: one image-wide tile per strip)."""
        lv = self._levels[level]
        return lv.tile_w, lv.tile_h, lv.nx, lv.ny

    def compression(self, level: int) -> str:
        """Codec of a level's tiles: "jpeg", "jpeg2000", "lzw", "deflate", "zstd", "webp", "packbits", "none"."""
        return self._levels[level].codec

    def raw_jpeg_tile(self, level: int, tx: int, ty: int) -> bytes:
        """A complete standalone JPEG stream for one tile (JPEGTables merged in; RGB-coded tiles get
        an Adobe APP14 transform=0 marker, so any standard decoder returns the right colours)."""
        lv = self._levels[level]
        if lv.compression != 7 or lv.planar != 1:
            raise ValueError(
                f"{self.url}: level {level} is {lv.codec}, not JPEG; there is no JPEG tile to copy"
            )
        if not (0 <= tx < lv.nx and 0 <= ty < lv.ny):
            raise IndexError(
                f"{self.url}: tile ({tx}, {ty}) outside the {lv.nx}x{lv.ny} grid of level {level}"
            )
        idx = ty * lv.nx + tx
        data = self._get(self._tables[level], idx, level)
        if not data:
            raise UnreadableTileError(
                f"{self.url}: level {level} tile {idx} ({tx}, {ty}) is empty (sparse)", self.url
            )
        return self._jpeg_stream(level, idx, data)

    def raw_jpeg_tiles(self, level: int, tiles: list[tuple[int, int]]) -> list[bytes]:
        """Standalone JPEG streams (as :meth:`raw_jpeg_tile`) of many tiles of one JPEG level, fetched
        in one batch (one round of concurrent ranged reads remotely); b"" for a sparse tile."""
        lv = self._levels[level]
        if not self.jpeg_level(level):
            raise ValueError(f"{self.url}: level {level} is not an 8-bit RGB tiled JPEG level")
        for tx, ty in tiles:
            if not (0 <= tx < lv.nx and 0 <= ty < lv.ny):
                raise IndexError(
                    f"{self.url}: tile ({tx}, {ty}) outside the {lv.nx}x{lv.ny} grid of level {level}"
                )
        idxs = [ty * lv.nx + tx for tx, ty in tiles]
        get = self._getter(self._tables[level], idxs if self._fd is None else None, level)
        out = []
        for i in idxs:
            data = get(i)
            out.append(self._jpeg_stream(level, i, data) if data else b"")
        return out

    def jpeg_level(self, level: int) -> bool:
        """Whether a level's tiles are 8-bit 3-sample interleaved JPEG tiles (what the scaled and
        the GPU decode take)."""
        lv = self._levels[level]
        return lv.compression == 7 and lv.planar == 1 and lv.spp == 3 and lv.bits == 8 and lv.tiled

    def jpeg_rgb_coded(self, level: int) -> bool:
        """Whether a JPEG level's streams code R, G, B directly (no colour transform)."""
        return self._levels[level].jpeg_colorspace == 2

    def _jpeg_stream(self, level: int, idx: int, data: bytes) -> bytes:
        """``data`` (one tile's stored bytes) as a standalone stream: SOI, an Adobe APP14
        transform=0 marker for RGB-coded levels, the JPEGTables segments, then the tile's own."""
        if data[:2] != b"\xff\xd8":
            raise UnreadableTileError(f"{self.url}: level {level} tile {idx} is not a JPEG stream", self.url)
        head = self._prefix[level]
        if head is None:
            lv = self._levels[level]
            tables = lv.jpegtables or b""
            if tables.startswith(b"\xff\xd8"):
                tables = tables[2:]
            if tables.endswith(b"\xff\xd9"):
                tables = tables[:-2]
            head = self._prefix[level] = (
                b"\xff\xd8" + (_ADOBE_RGB if lv.jpeg_colorspace == 2 else b"") + tables
            )
        return head + data[2:]

    def raw_tile(self, level: int, tx: int, ty: int) -> bytes:
        """The tile's bytes exactly as stored (b"" for a sparse tile); plane 0 for planar images."""
        lv = self._levels[level]
        return self._get(self._tables[level], ty * lv.nx + tx, level)

    def jpeg_params(self, level: int) -> dict:
        """Keyword arguments of ``imagecodecs.jpeg8_decode`` that decode this level's raw tiles."""
        lv = self._levels[level]
        if lv.compression != 7:
            raise ValueError(f"{self.url}: level {level} is {lv.codec}, not JPEG")
        return {
            "tables": lv.jpegtables,
            "colorspace": lv.jpeg_colorspace,
            "outcolorspace": lv.jpeg_outcolorspace,
        }
