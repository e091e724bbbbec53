"""The I/O core (wsi.byteio) and the raw-tiles capability: one byte-range reader for the TIFF and
Zarr backends, local and over a real HTTP server; what survives fork(); retry timing; local paths
taken literally; ``convert`` asking for the RawTiles protocol instead of private attributes."""

from __future__ import annotations

import multiprocessing as mp
import random

import numpy as np
import pytest
from conftest import DEMO_SLIDE
from httpserver import serve

import wsi
from wsi.backends.base import RawTiles
from wsi.byteio import ByteSource, DecodePool, RetryPolicy, local_path
from wsi.convert import convert
from wsi.errors import DecodeLimitError, SlideError
from wsi.synth import load_demo_pixels, write_tiff_pyramid


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    d = tmp_path_factory.mktemp("iocore")
    write_tiff_pyramid(d / "s.svs", load_demo_pixels(DEMO_SLIDE)[:600, :700], tile=128, downsamples=(1, 4))
    convert(d / "s.svs", d / "s.zarr", tile=128, shard_tiles=2, progress=False)
    (d / "blob.bin").write_bytes(bytes(range(256)) * 40)
    with serve(d) as srv:
        yield d, srv


@pytest.mark.parametrize("where", ["local", "http"])
def test_ranges_contract(www, where):
    d, srv = www
    data = (d / "blob.bin").read_bytes()
    src = ByteSource(str(d) if where == "local" else srv.url().rstrip("/"))
    try:
        got = src.ranges(
            [("blob.bin", 10, 20), ("blob.bin", -5, None), ("blob.bin", 10000, None), ("nope", 0, 4)]
        )
        assert got[:3] == [data[10:20], data[-5:], data[10000:]] and got[3] is None
        assert (
            src.ranges([("blob.bin", len(data) - 3, len(data) + 10)])[0] == data[-3:]
        )  # short: the object ends
        assert src.read_all("blob.bin", limit=len(data)) == data
        with pytest.raises(DecodeLimitError):
            src.read_all("blob.bin", limit=100)
        assert src.exists("blob.bin") and not src.exists("missing")
        with src.open("blob.bin", block=64) as f:  # block cache: small scattered reads
            f.seek(1000)
            assert f.read(100) == data[1000:1100]
            f.seek(-10, 2)
            assert f.read() == data[-10:]
    finally:
        src.close()
    with pytest.raises(SlideError, match="closed"):
        src.ranges([("blob.bin", 0, 1)])


def _read_after_fork(slide, locs, q) -> None:
    try:
        q.put([a.tobytes() for a in slide.read_regions(locs, 0, (128, 128), threads=2)])
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(repr(e))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["s.svs", "s.zarr"])
@pytest.mark.parametrize("where", ["local", "http"])
def test_a_slide_opened_before_fork_reads_in_the_child(www, name, where):
    """DataLoader workers started with fork inherit open slides: the child gets its own pool,
    descriptors and (remote) filesystem instead of the parent's dead threads and event loop."""
    d, srv = www
    url = str(d / name) if where == "local" else srv.url(name)
    locs = [(0, 0), (128, 0), (256, 128), (384, 256)]
    with wsi.open_slide(url) as s:
        want = [a.tobytes() for a in s.read_regions(locs, 0, (128, 128), threads=2)]  # pools now running
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_read_after_fork, args=(s, locs, q))
        p.start()
        got = q.get(timeout=60)
        p.join(30)
        assert p.exitcode == 0
        assert got == want
        assert [
            a.tobytes() for a in s.read_regions(locs, 0, (128, 128), threads=2)
        ] == want  # parent still fine


def test_decode_pool_is_made_anew_after_fork():
    pool = DecodePool("t")
    parent = pool.get(2)
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        q.put(pool.get(2).submit(lambda: 41 + 1).result(timeout=10))

    p = ctx.Process(target=child)
    p.start()
    assert q.get(timeout=30) == 42
    p.join(10)
    assert pool.get(2) is parent
    pool.shutdown()


def test_backoff_is_full_jitter_bounded_and_honours_retry_after():
    pol = RetryPolicy(backoff=0.1, max_backoff=1.0, max_retry_after=5.0)
    rng = random.Random(0)
    waits = [[pol.delay(k, None, rng) for _ in range(200)] for k in (1, 2, 3, 6)]
    assert all(0 <= w <= 0.1 for w in waits[0]) and max(waits[0]) > 0.05
    assert all(0 <= w <= 0.2 for w in waits[1]) and max(waits[1]) > 0.1
    assert all(0 <= w <= 1.0 for w in waits[3]) and max(waits[3]) > 0.5  # capped at max_backoff
    assert len(set(waits[2])) > 150  # jitter: retries of many clients spread out
    assert pol.delay(1, 3.0, rng) == 3.0 and pol.delay(1, 60.0, rng) == 5.0
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_local_paths_are_never_urls(tmp_path):
    for name in ("a#b.svs", "a?x=1.svs", "a::b.svs", "ça.svs"):
        assert local_path(str(tmp_path / name)) == str(tmp_path / name)
    assert local_path("file:///x/a#b.svs") == "/x/a#b.svs"
    assert local_path("https://h/a.svs") is None and local_path("s3://b/a.svs") is None


def test_raw_tiles_is_a_declared_capability(www):
    d, _ = www
    with wsi.open_slide(d / "s.svs") as t, wsi.open_slide(d / "s.zarr") as z:
        assert isinstance(t.raw_tiles, RawTiles) and t.raw_tiles.compression(0) == "jpeg"
        assert z.raw_tiles is None  # the Zarr backend does not offer it: convert re-encodes
        tx, ty = 1, 2
        raw = t.raw_tiles.raw_jpeg_tile(0, tx, ty)
        import imagecodecs

        assert np.array_equal(
            imagecodecs.jpeg8_decode(raw), t.read_level_region(0, (128 * tx, 128 * ty), (128, 128))
        )
        # level-pixel reads equal level-0 reads where the two name the same pixels, white outside
        assert np.array_equal(
            t.read_level_region(1, (10, 20), (50, 40)), t.read_region((40, 80), 1, (50, 40))
        )
        assert (t.read_level_region(1, (170, 0), (20, 5))[:, 5:] == 255).all()


def test_convert_from_a_backend_without_raw_tiles(www, tmp_path):
    d, _ = www
    out = convert(d / "s.zarr", tmp_path / "again.zarr", tile=128, shard_tiles=2, progress=False)
    import json

    report = json.loads((tmp_path / "again.zarr" / "zarr.json").read_text())["attributes"]["slidestream"]
    assert report["conversion"]["levels"][0]["mode"] == "reencoded"
    with wsi.open_slide(out) as a, wsi.open_slide(d / "s.zarr") as b:
        assert a.level_dimensions[:2] == b.level_dimensions[:2]
        ref, got = b.read_region((0, 0), 0, (300, 200)), a.read_region((0, 0), 0, (300, 200))
        assert np.abs(ref.astype(int) - got.astype(int)).mean() < 2.0  # re-encoded as JPEG q90
