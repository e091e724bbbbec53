"""One conformance suite for every slide backend (zarr's ``StoreTests`` pattern).

Subclass :class:`SlideBackendTests` and provide a ``case`` fixture that returns a
:class:`SlideCase` (usually parametrised over many slides)::

    class TestZarrBackend(SlideBackendTests):
        @pytest.fixture(params=[...], scope="class")  # class scope: each slide is built once
        @classmethod
        def case(cls, request, tmp_path_factory) -> SlideCase:
            return SlideCase(id=..., url=str(store), backend="zarr", openslide_path=str(src_svs))

The reference is OpenSlide (``openslide_path``, wherever OpenSlide reads the file) or numpy arrays
of the levels (``levels``; level 0 first, missing levels are not pixel-checked).

Pixel tolerance (``max_diff``, default 0). slidestream's TIFF backend and OpenSlide decode JPEG with
the same libjpeg-turbo (ISLOW IDCT, fancy upsampling) and JPEG 2000 with the same OpenJPEG, and
lossless codecs are exact, so 0 is expected and asserted for every shipped fixture. A backend that
re-encodes pixels (e.g. Zarr chunks recompressed as JPEG) states its own ``max_diff`` and
``max_mean_diff`` in its cases.

Unaligned boxes on non-integer-downsample levels. A level-0 location ``loc`` names level pixel
``floor(loc / ds)``; slidestream returns the level's pixels from there, exactly (checked against array
references). OpenSlide instead draws the level at the fractional position ``loc / ds``, which lies
in ``[x, x + 1)``: each of its pixels is a bilinear mix of the 2x2 level pixels at and after ours. So
against OpenSlide (and for ``resamples`` backends — OpenSlide itself — against arrays) these boxes
are compared with a stated sub-pixel tolerance: every pixel must lie within the range of the exact
read's 2x2 neighbourhood, widened by :data:`SUBPIXEL_TOL` for rounding.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

import wsi
from wsi.errors import MissingMppError, SlideError


@dataclass
class SlideCase:
    id: str
    url: str
    backend: str  # the backend the slide must be opened with (also checked on open)
    openslide_path: str | None = None  # OpenSlide reference (local file OpenSlide can read)
    levels: list[np.ndarray] | None = None  # array reference, level 0 first
    max_diff: int = 0  # largest per-pixel |difference| allowed against the reference
    max_mean_diff: float = 0.0  # largest mean |difference| allowed
    mpp: (
        float | None | type(Ellipsis)
    ) = ...  # expected mpp when there is no OpenSlide reference (... = unchecked)
    open_kw: dict = field(default_factory=dict)
    resamples: bool = False  # the backend interpolates fractional positions (OpenSlide itself)


#: rounding allowance of the sub-pixel comparison (cairo's bilinear filter rounds each channel)
SUBPIXEL_TOL = 1


def _close_enough(a: np.ndarray, b: np.ndarray, case: SlideCase, what: str) -> None:
    assert a.shape == b.shape, f"{case.id} {what}: shape {a.shape} != reference {b.shape}"
    assert a.dtype == np.uint8
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert int(d.max(initial=0)) <= case.max_diff, (
        f"{case.id} {what}: max |diff| {int(d.max())} > {case.max_diff}"
    )
    assert float(d.mean()) <= case.max_mean_diff + 1e-9, f"{case.id} {what}: mean |diff| {d.mean():.3f}"


def _subpixel_close(exact_ext: np.ndarray, other: np.ndarray, case: SlideCase, what: str) -> None:
    """``other`` (h, w) within the 2x2-neighbourhood range of ``exact_ext`` (h + 1, w + 1), ± the
    tolerance: ``other`` is ``exact`` shifted by less than one pixel right/down and resampled."""
    h, w = other.shape[:2]
    assert exact_ext.shape[:2] == (h + 1, w + 1), f"{case.id} {what}: reference shape {exact_ext.shape}"
    a = exact_ext.astype(np.int16)
    win = np.stack([a[:-1, :-1], a[:-1, 1:], a[1:, :-1], a[1:, 1:]])
    lo, hi = win.min(axis=0), win.max(axis=0)
    o = other.astype(np.int16)
    excess = np.maximum(lo - o, o - hi).max(initial=0)
    tol = SUBPIXEL_TOL + case.max_diff
    assert excess <= tol, f"{case.id} {what}: {excess} outside the sub-pixel range (tolerance {tol})"


def _openslide_rgb(osr, loc, level, size) -> np.ndarray:
    from wsi.backends.openslide_backend import rgba_to_rgb_white

    return rgba_to_rgb_white(np.asarray(osr.read_region(loc, level, size)))


def _array_region(arr: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    out = np.full((h, w, 3), 255, np.uint8)
    H, W = arr.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = arr[y0:y1, x0:x1]
    return out


def _boxes(level_size, tile) -> list[tuple[str, int, int, int, int]]:
    """(name, x, y, w, h) in level pixels: aligned, unaligned multi-tile, edge, outside, big."""
    lw, lh = level_size
    tw, th = tile
    boxes = [("origin", 0, 0, min(lw, 200), min(lh, 150))]
    if lw > tw and lh > th:
        boxes.append(("aligned", tw, th, min(tw, lw - tw), min(th, lh - th)))
    boxes.append(("unaligned", min(lw - 1, tw // 2 + 3), min(lh - 1, th // 3 + 1), tw + 17, th // 2 + 5))
    boxes.append(("edge", lw - 20, lh - 15, 50, 40))
    boxes.append(("big", 0, 0, min(lw, 3 * tw + 5), min(lh, 2 * th + 7)))
    return boxes


class SlideBackendTests:
    """Base tests; subclasses provide the ``case`` fixture."""

    @pytest.fixture
    def case(self) -> SlideCase:  # pragma: no cover - overridden
        raise NotImplementedError("subclasses provide a `case` fixture returning a SlideCase")

    @pytest.fixture
    def slide(self, case):
        s = wsi.open_slide(case.url, backend=case.backend, **case.open_kw)
        yield s
        s.close()

    @pytest.fixture
    def osr(self, case):
        if case.openslide_path is None:
            yield None
            return
        import openslide

        o = openslide.OpenSlide(case.openslide_path)
        yield o
        o.close()

    # --- metadata -----------------------------------------------------------------------------
    def test_levels_and_mpp(self, case, slide, osr):
        assert slide.backend == case.backend
        assert slide.level_count >= 1 and slide.level_downsamples[0] == 1.0
        dims = slide.level_dimensions
        assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(dims, dims[1:]))
        if osr is not None:
            assert dims == tuple(tuple(d) for d in osr.level_dimensions)
            assert slide.level_downsamples == pytest.approx(osr.level_downsamples, rel=1e-6)
            ref = osr.properties.get("openslide.mpp-x")
            if ref is None:
                assert slide.mpp is None
            else:
                assert slide.mpp == pytest.approx(float(ref), rel=1e-6)
        if case.levels is not None:
            for i, arr in enumerate(case.levels):
                assert dims[i] == (arr.shape[1], arr.shape[0])
        if case.mpp is not ...:
            assert slide.mpp == (pytest.approx(case.mpp, rel=1e-6) if case.mpp is not None else None)
        if slide.level_tile_sizes is not None:
            assert len(slide.level_tile_sizes) == slide.level_count

    # --- pixels -------------------------------------------------------------------------------
    def test_read_region_pixels(self, case, slide, osr):
        checked = 0
        for level in range(min(slide.level_count, 3)):
            ds = slide.level_downsamples[level]
            integral = abs(ds - round(ds)) < 1e-9
            tile = (slide.level_tile_sizes or [(256, 256)] * slide.level_count)[level]
            arr = case.levels[level] if case.levels is not None and level < len(case.levels) else None
            for name, x, y, w, h in _boxes(slide.level_dimensions[level], tile):
                what = f"level {level} {name} box {(x, y, w, h)}"
                if integral or (x, y) == (0, 0):
                    loc = (math.floor(x * ds), math.floor(y * ds))
                    got = slide.read_region(loc, level, (w, h))
                    if osr is not None and level < osr.level_count:
                        _close_enough(
                            got, _openslide_rgb(osr, loc, level, (w, h)), case, what + " vs OpenSlide"
                        )
                        checked += 1
                    if arr is not None:
                        xl, yl = math.floor(loc[0] / ds), math.floor(loc[1] / ds)
                        _close_enough(got, _array_region(arr, xl, yl, w, h), case, what + " vs array")
                        checked += 1
                    continue
                # unaligned on a non-integer level: a level-0 location that names level pixel (x, y)
                loc = (math.ceil(x * ds), math.ceil(y * ds))
                assert (math.floor(loc[0] / ds), math.floor(loc[1] / ds)) == (x, y), (loc, ds)
                got = slide.read_region(loc, level, (w, h))
                if arr is not None:
                    if case.resamples:
                        _subpixel_close(_array_region(arr, x, y, w + 1, h + 1), got, case, what + " vs array")
                    else:
                        _close_enough(got, _array_region(arr, x, y, w, h), case, what + " vs array")
                    checked += 1
                if osr is not None and level < osr.level_count and not case.resamples:
                    ext = slide.read_region(loc, level, (w + 1, h + 1))
                    assert np.array_equal(ext[:h, :w], got)
                    ref = _openslide_rgb(osr, loc, level, (w, h))
                    _subpixel_close(ext, ref, case, what + " vs OpenSlide (sub-pixel)")
                    checked += 1
        assert checked, f"{case.id}: no reference to compare pixels with"

    def test_outside_is_white(self, slide):
        W, H = slide.dimensions
        assert (slide.read_region((W + 5, H + 5), 0, (32, 16)) == 255).all()
        assert (slide.read_region((-100, -100), 0, (40, 40)) == 255).all()
        part = slide.read_region((-10, 0), 0, (30, 5))
        assert (part[:, :10] == 255).all() and part.shape == (5, 30, 3)

    def test_read_regions_match_read_region(self, slide):
        W, H = slide.level_dimensions[0]
        tw, th = (slide.level_tile_sizes or [(64, 64)])[0]
        w, h = min(tw, W), min(th, H)
        locs = [(0, 0), ((W - w) // 2, (H - h) // 3), (W - w, H - h), (min(tw, W - w), 0)]
        batch = slide.read_regions(locs, 0, (w, h), threads=2)
        for loc, got in zip(locs, batch):
            assert np.array_equal(got, slide.read_region(loc, 0, (w, h)))

    def test_read_region_mpp(self, case, slide):
        if slide.mpp is None:
            with pytest.raises(MissingMppError):
                slide.read_region_mpp((0, 0), (16, 16), 1.0)
            return
        W, H = slide.dimensions
        size = (min(64, W), min(48, H))
        same = slide.read_region_mpp((3, 5), size, slide.mpp)
        assert np.array_equal(same, slide.read_region((3, 5), 0, size))
        coarse = slide.read_region_mpp((0, 0), size, slide.mpp * 2)
        assert coarse.shape == (size[1], size[0], 3) and coarse.dtype == np.uint8
        # the pixels come from the level region_for_mpp names, resized (levels of real pyramids need
        # not agree with a resize of level 0: no_dzi.tif's level 1 differs from its level 0)
        level, (x, y, w, h) = slide.region_for_mpp((0, 0), size, slide.mpp * 2)
        assert slide.level_mpp(level) <= slide.mpp * 2 * (1 + 1e-6)
        ds = slide.level_downsamples[level]
        src = slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
        assert np.array_equal(coarse, wsi.slide.resize_rgb(src, size))

    def test_thumbnail(self, slide):
        t = slide.get_thumbnail((128, 128))
        W, H = slide.dimensions
        assert t.dtype == np.uint8 and t.ndim == 3 and t.shape[2] == 3
        assert max(t.shape[:2]) <= 128 and (t.shape[1] == 128 or t.shape[0] == 128 or max(W, H) <= 128)
        assert abs(t.shape[1] / t.shape[0] - W / H) < 0.05 * W / H + 2 / min(t.shape[:2])

    def test_associated_images(self, case, slide, osr):
        names = list(slide.associated_images)
        if osr is not None:
            assert sorted(names) == sorted(osr.associated_images)
        for n in names:
            img = slide.associated_images[n]
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            if osr is not None:
                ref = np.asarray(osr.associated_images[n].convert("RGB"))
                _close_enough(img, ref, case, f"associated image {n}")

    # --- lifecycle and threads ----------------------------------------------------------------
    def test_context_manager_closes(self, case):
        with wsi.open_slide(case.url, backend=case.backend, **case.open_kw) as s:
            s.read_region((0, 0), 0, (8, 8))
        with pytest.raises(SlideError):
            s.read_region((0, 0), 0, (8, 8))
        s.close()  # idempotent

    def test_concurrent_reads_equal_serial(self, slide):
        W, H = slide.dimensions
        rng = np.random.default_rng(0)
        locs = [
            (int(rng.integers(0, max(1, W - 40))), int(rng.integers(0, max(1, H - 40)))) for _ in range(16)
        ]
        serial = [slide.read_region(loc, 0, (40, 40)) for loc in locs]
        got: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def worker(ks):
            try:
                for k in ks:
                    got[k] = slide.read_region(locs[k], 0, (40, 40))
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(range(i, len(locs), 2),)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        assert all(np.array_equal(got[k], serial[k]) for k in range(len(locs)))
