"""Remote reads over a real HTTP server on 127.0.0.1 (tests/httpserver.py: Range support, bytes
counted per request) and fsspec's memory filesystem: remote pixels equal local pixels, and reading
one tile transfers about one tile (proof that nothing downloads whole files or read-ahead blocks)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import tifffile
from conformance import SlideBackendTests, SlideCase
from conftest import DEMO_SLIDE
from httpserver import serve

import wsi
from wsi.convert import convert
from wsi.synth import load_demo_pixels, write_tiff_pyramid

TILE = 256


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("www")
    px = load_demo_pixels(DEMO_SLIDE)[:1400, :1800]
    write_tiff_pyramid(d / "slide.svs", px, tile=TILE, downsamples=(1, 4))
    convert(d / "slide.svs", d / "slide.zarr", tile=TILE, shard_tiles=4, progress=False)
    with serve(d) as srv:
        yield d, srv


LOCS = [
    ((0, 0), 0, (256, 256)),
    ((300, 250), 0, (500, 400)),
    ((1700, 1300), 0, (200, 200)),
    ((100, 40), 1, (300, 200)),
]


@pytest.mark.parametrize("name,backend", [("slide.zarr", "zarr"), ("slide.svs", "tiff")])
def test_remote_reads_equal_local(served, name, backend):
    d, srv = served
    with wsi.open_slide(srv.url(name)) as r, wsi.open_slide(d / name) as loc:
        assert r.backend == loc.backend == backend
        assert r.level_dimensions == loc.level_dimensions and r.mpp == pytest.approx(loc.mpp)
        for xy, level, size in LOCS:
            assert np.array_equal(r.read_region(xy, level, size), loc.read_region(xy, level, size))
        locs = [(256 * i, 256 * j) for i in range(3) for j in range(2)]
        assert all(
            np.array_equal(a, b)
            for a, b in zip(
                r.read_regions(locs, 0, (256, 256), threads=2),
                loc.read_regions(locs, 0, (256, 256), threads=2),
            )
        )


def _zarr_chunk_size(store: Path, tx: int, ty: int, n: int = 4) -> tuple[int, int]:
    """(encoded size of chunk (ty, tx), size of its shard's index)."""
    data = (store / "0" / "c" / "0" / str(ty // n) / str(tx // n)).read_bytes()
    isize = n * n * 16 + 4
    index = np.frombuffer(data[-isize:-4], "<u8").reshape(n, n, 2)
    return int(index[ty % n, tx % n, 1]), isize


def test_zarr_one_tile_transfers_about_one_tile(served):
    d, srv = served
    srv.reset()
    with wsi.open_slide(srv.url("slide.zarr")) as s:
        meta = srv.bytes_sent()
        assert meta < 64_000  # zarr.json files only
        srv.reset()
        tx, ty = 5, 2
        s.read_region((tx * TILE, ty * TILE), 0, (TILE, TILE))
        size, isize = _zarr_chunk_size(d / "slide.zarr", tx, ty)
        first = srv.bytes_sent()
        assert first <= 2 * size + isize, srv.requests  # the chunk plus its shard's index, once
        srv.reset()
        s.read_region(((tx + 1) * TILE, ty * TILE), 0, (TILE, TILE))  # same shard: index cached
        size2, _ = _zarr_chunk_size(d / "slide.zarr", tx + 1, ty)
        assert srv.bytes_sent() <= 2 * size2 and len(srv.requests) == 1, srv.requests


def test_tiff_one_tile_transfers_about_one_tile(served):
    """backend="tiff" given: open_slide's format probing for backend="auto" is tested below."""
    d, srv = served
    with tifffile.TiffFile(d / "slide.svs") as t:
        page = t.pages[0]
        nx = -(-page.imagewidth // TILE)
        tx, ty = 4, 3
        size = page.databytecounts[ty * nx + tx]
        file_size = (d / "slide.svs").stat().st_size
    srv.reset()
    with wsi.open_slide(srv.url("slide.svs"), backend="tiff") as s:
        meta = srv.bytes_sent()
        assert meta < file_size, f"open fetched {meta} of {file_size} bytes"
        srv.reset()
        s.read_region((tx * TILE, ty * TILE), 0, (TILE, TILE))
        assert srv.bytes_sent() <= 2 * size, srv.requests


def test_auto_backend_probe_does_not_download_the_file(served):
    d, srv = served
    srv.reset()
    with wsi.open_slide(srv.url("slide.svs")) as s:
        assert s.backend == "tiff"
    assert srv.bytes_sent() < (d / "slide.svs").stat().st_size, srv.requests


def test_memory_filesystem(served):
    d, _ = served
    fs = fsspec.filesystem("memory")
    fs.put(str(d / "slide.zarr"), "/h2test/slide.zarr", recursive=True)
    try:
        with wsi.open_slide("memory://h2test/slide.zarr") as m, wsi.open_slide(d / "slide.zarr") as loc:
            assert m.backend == "zarr" and m.level_dimensions == loc.level_dimensions
            for xy, level, size in LOCS:
                assert np.array_equal(m.read_region(xy, level, size), loc.read_region(xy, level, size))
            assert sorted(m.associated_images) == sorted(loc.associated_images)
    finally:
        fs.rm("/h2test", recursive=True)


def test_convert_from_http_source(served, tmp_path):
    d, srv = served
    out = convert(srv.url("slide.svs"), tmp_path / "r.zarr", tile=TILE, shard_tiles=4, progress=False)
    with wsi.open_slide(out) as a, wsi.open_slide(d / "slide.zarr") as b:
        assert a.level_dimensions == b.level_dimensions
        assert np.array_equal(a.read_region((0, 0), 0, (600, 500)), b.read_region((0, 0), 0, (600, 500)))


class TestRemoteZarrConformance(SlideBackendTests):
    """The whole backend suite over HTTP: the demo slide converted with JPEG pass-through, checked
    pixel for pixel against OpenSlide on the local SVS."""

    @pytest.fixture(scope="class")
    @classmethod
    def case(cls, served) -> SlideCase:
        d, srv = served
        convert(
            DEMO_SLIDE, d / "demo.zarr", tile=240, levels=(1,), shard_tiles=8, progress=False, overwrite=True
        )
        return SlideCase("http-demo-zarr", srv.url("demo.zarr"), "zarr", openslide_path=str(DEMO_SLIDE))


class TestRemoteTiffConformance(SlideBackendTests):
    """The TIFF backend over HTTP through the whole suite: a JPEG pyramid and a deflate pyramid with
    non-integer downsamples, against OpenSlide on the same files read locally."""

    @pytest.fixture(params=["aperio_nonint.svs", "generic_nonint.tif"], scope="class")
    @classmethod
    def case(cls, request, served) -> SlideCase:
        d, srv = served
        p = d / request.param
        if not p.exists():
            px = load_demo_pixels(DEMO_SLIDE)[200:900, 300:1100]
            kw = {"flavor": "generic", "compression": "deflate"} if p.suffix == ".tif" else {}
            write_tiff_pyramid(p, px, tile=128, level_sizes=[(800, 700), (333, 291), (130, 113)], **kw)
        return SlideCase(f"http-{request.param}", srv.url(request.param), "tiff", openslide_path=str(p))
