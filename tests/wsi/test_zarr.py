"""The Zarr backend and the slidestream.jpeg codec, on real zarr stores: converted from the demo
slide and generated pyramids, written by zarr-python (v3 and v2), and deliberately damaged ones."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from conformance import SlideBackendTests, SlideCase
from conftest import DEMO_SLIDE

import wsi
from wsi.backends.zarr_backend import ZarrBackend
from wsi.codecs import JPEG_CODEC_ID, JpegCodec
from wsi.convert import convert
from wsi.errors import DecodeLimitError, UnreadableTileError, UnsupportedSlideError
from wsi.synth import load_demo_pixels, write_tiff_pyramid


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return load_demo_pixels(DEMO_SLIDE)[:700, :900].copy()


def _ngff_v2(root: Path, levels: list[np.ndarray], mpp: float, compressor) -> None:
    """An NGFF 0.4 OME-Zarr on zarr v2 written by zarr-python, axes y, x, c."""
    g = zarr.open_group(str(root), mode="w", zarr_format=2)
    for i, a in enumerate(levels):
        g.create_array(str(i), data=a, chunks=(128, 128, 3), compressors=compressor)
    g.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
                {"name": "c", "type": "channel"},
            ],
            "datasets": [
                {
                    "path": str(i),
                    "coordinateTransformations": [{"type": "scale", "scale": [mpp * 2**i, mpp * 2**i, 1]}],
                }
                for i in range(len(levels))
            ],
        }
    ]


# --------------------------------------------------------------------------------------------
# codec
# --------------------------------------------------------------------------------------------
def test_codec_registered_on_import():
    assert zarr.registry.get_codec_class(JPEG_CODEC_ID) is JpegCodec
    c = JpegCodec.from_dict({"name": JPEG_CODEC_ID, "configuration": {"quality": 80, "layout": "CYX"}})
    assert c.to_dict() == {
        "name": JPEG_CODEC_ID,
        "configuration": {"quality": 80, "colorspace": "ycbcr", "layout": "CYX"},
    }
    with pytest.raises(ValueError, match="quality"):
        JpegCodec(quality=0)


@pytest.mark.parametrize("layout,colorspace", [("YXC", "ycbcr"), ("CYX", "rgb")])
def test_codec_round_trip_through_zarr_python(tmp_path, pixels, layout, colorspace):
    img = pixels[:300, :260]
    data = img if layout == "YXC" else img.transpose(2, 0, 1)
    chunks = (128, 128, 3) if layout == "YXC" else (3, 128, 128)
    a = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=data.shape,
        chunks=chunks,
        dtype="uint8",
        fill_value=255,
        serializer=JpegCodec(quality=95, colorspace=colorspace),
        compressors=None,
    )
    a[:] = data
    meta = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())
    assert meta["codecs"][0]["configuration"]["layout"] == layout
    back = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[:]
    diff = np.abs(back.astype(int) - data)
    psnr = 10 * np.log10(255**2 / (diff.astype(float) ** 2).mean())
    assert back.shape == data.shape and diff.mean() < 2.5 and psnr > 30  # lossy, but close
    # a chunk is a plain JPEG: PIL (no slidestream) decodes it to the same pixels
    from PIL import Image

    raw = (tmp_path / "a.zarr" / "c" / "0" / "0" / "0").read_bytes()
    pil = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    first = back[:128, :128] if layout == "YXC" else back[:, :128, :128].transpose(1, 2, 0)
    assert np.abs(pil.astype(int) - first).max() <= 2


@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_zarr_builtin_lossless_codecs_read_exactly(tmp_path, pixels, codec):
    comp = zarr.codecs.ZstdCodec(level=3) if codec == "zstd" else zarr.codecs.BloscCodec(cname="lz4")
    store = tmp_path / "s.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=3)
    g.create_array(
        "0",
        data=pixels,
        chunks=(128, 128, 3),
        shards=(256, 512, 3),
        compressors=comp,
        dimension_names=("y", "x", "c"),
    )
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                    {"name": "c", "type": "channel"},
                ],
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}
                ],
            }
        ],
    }
    with wsi.open_slide(store) as s:
        assert s.backend == "zarr" and s.mpp is None and s.dimensions == (900, 700)
        assert np.array_equal(s.read_region((0, 0), 0, (900, 700)), pixels)
        assert np.array_equal(s.read_region((100, 50), 0, (300, 200)), pixels[50:250, 100:400])


# --------------------------------------------------------------------------------------------
# conformance suite
# --------------------------------------------------------------------------------------------
def _demo_passthrough(d: Path, _px):
    out = convert(DEMO_SLIDE, d / "demo240.zarr", tile=240, levels=(1,), progress=False)
    return SlideCase("demo-jpeg-passthrough", out, "zarr", openslide_path=str(DEMO_SLIDE))


def _demo_zstd(d: Path, _px):
    out = convert(
        DEMO_SLIDE, d / "demo-zstd.zarr", tile=256, codec="zstd", levels=(1,), shard_tiles=4, progress=False
    )
    return SlideCase("demo-zstd", out, "zarr", openslide_path=str(DEMO_SLIDE))


def _synth_pyramid(d: Path, px):
    src = d / "synth.svs"
    write_tiff_pyramid(src, px, tile=128, downsamples=(1, 2, 4), quality=85)
    out = convert(src, d / "synth.zarr", tile=128, shard_tiles=4, progress=False)
    return SlideCase("synth-aperio-passthrough", out, "zarr", openslide_path=str(src))


def _v2_store(d: Path, px):
    levels = [px, np.ascontiguousarray(px[::2, ::2]), np.ascontiguousarray(px[::4, ::4])]
    import numcodecs

    _ngff_v2(d / "v2.zarr", levels, 0.25, numcodecs.Zstd(level=1))
    return SlideCase("ngff04-zarr-v2", str(d / "v2.zarr"), "zarr", levels=levels, mpp=0.25)


class TestZarrBackend(SlideBackendTests):
    @pytest.fixture(
        params=[_demo_passthrough, _demo_zstd, _synth_pyramid, _v2_store],
        ids=["demo-passthrough", "demo-zstd", "synth-passthrough", "v2"],
        scope="class",
    )
    @classmethod
    def case(cls, request, tmp_path_factory, pixels) -> SlideCase:
        return request.param(tmp_path_factory.mktemp("zcase"), pixels)


# --------------------------------------------------------------------------------------------
# bad input and edge cases
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_store(tmp_path_factory, pixels) -> Path:
    d = tmp_path_factory.mktemp("small")
    return Path(convert(DEMO_SLIDE, d / "s.zarr", tile=128, shard_tiles=4, levels=(1, 4), progress=False))


def _chunk_location(store: Path, level: int, cy: int, cx: int, n: int = 4) -> tuple[Path, int, int]:
    shard = store / str(level) / "c" / "0" / str(cy // n) / str(cx // n)
    data = shard.read_bytes()
    index = np.frombuffer(data[-(n * n * 16 + 4) : -4], "<u8").reshape(n, n, 2)
    off, length = index[cy % n, cx % n]
    return shard, int(off), int(length)


def test_decode_limit_raises_before_reading(small_store):
    with pytest.raises(DecodeLimitError, match="decode limit"):
        wsi.open_slide(small_store, decode_limit=128 * 128 * 3 - 1)
    with wsi.open_slide(small_store, decode_limit=128 * 128 * 3) as s:
        assert s.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)


def test_corrupt_chunk_raises_naming_store_level_and_chunk(tmp_path, small_store):
    import shutil

    store = tmp_path / "bad.zarr"
    shutil.copytree(small_store, store)
    shard, off, length = _chunk_location(store, 0, 1, 2)
    data = bytearray(shard.read_bytes())
    data[off + 2 : off + length] = b"\x00" * (length - 2)  # keep SOI, wipe the rest
    shard.write_bytes(bytes(data))
    with wsi.open_slide(store) as s:
        s.read_region((0, 0), 0, (128, 128))  # other chunks are fine
        with pytest.raises(UnreadableTileError) as e:
            s.read_region((2 * 128 + 5, 128 + 5), 0, (20, 20))
        msg = str(e.value)
        assert "bad.zarr" in msg and "level 0" in msg and "y=1, x=2" in msg
        with pytest.raises(UnreadableTileError):  # batched path too, never white pixels
            s.read_regions([(0, 0), (256, 128)], 0, (128, 128), threads=2)


def test_truncated_shard_and_bad_index(tmp_path, small_store):
    import shutil

    store = tmp_path / "trunc.zarr"
    shutil.copytree(small_store, store)
    shard = store / "0" / "c" / "0" / "0" / "0"
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])  # index crc and size now wrong
    with wsi.open_slide(store) as s, pytest.raises(UnreadableTileError, match="shard index"):
        s.read_region((0, 0), 0, (16, 16))


def test_missing_shard_and_chunk_read_as_fill(tmp_path, small_store):
    import shutil

    store = tmp_path / "sparse.zarr"
    shutil.copytree(small_store, store)
    (store / "0" / "c" / "0" / "0" / "1").unlink()  # tiles x 4..7, y 0..3
    with wsi.open_slide(store) as s, wsi.open_slide(small_store) as ref:
        assert (s.read_region((4 * 128, 0), 0, (256, 256)) == 255).all()
        assert np.array_equal(s.read_region((0, 0), 0, (256, 256)), ref.read_region((0, 0), 0, (256, 256)))
    # zarr-python leaves chunks equal to the fill value unwritten: they read as white too
    a = zarr.create_array(
        str(tmp_path / "z.zarr"),
        shape=(300, 300, 3),
        chunks=(100, 100, 3),
        dtype="uint8",
        fill_value=255,
        dimension_names=("y", "x", "c"),
    )
    a[:100, :100] = 7
    with wsi.open_slide(tmp_path / "z.zarr") as s:
        img = s.read_region((0, 0), 0, (300, 300))
        assert (img[:100, :100] == 7).all() and (img[100:] == 255).all()


def test_fallback_layouts_read_through_zarr_python(tmp_path, pixels):
    # chunks split along the channel axis and a transpose codec: not on the fast path
    planar = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    a = zarr.create_array(
        str(tmp_path / "p.zarr"),
        shape=planar.shape,
        chunks=(1, 256, 256),
        dtype="uint8",
        dimension_names=("c", "y", "x"),
    )
    a[:] = planar
    with wsi.open_slide(tmp_path / "p.zarr") as s:
        assert s._b._arrays[0].fallback_reason is not None
        assert np.array_equal(s.read_region((10, 20), 0, (300, 200)), pixels[20:220, 10:310])
    b = zarr.create_array(
        str(tmp_path / "t.zarr"),
        shape=pixels.shape,
        chunks=(256, 256, 3),
        dtype="uint8",
        filters=[zarr.codecs.TransposeCodec(order=(1, 0, 2))],
        dimension_names=("y", "x", "c"),
    )
    b[:] = pixels
    with wsi.open_slide(tmp_path / "t.zarr") as s:
        assert np.array_equal(s.read_region((0, 0), 0, (900, 700)), pixels)


def test_not_a_slide_store(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    g.create_array("x", shape=(4,), dtype="float32")
    with pytest.raises(UnsupportedSlideError, match="multiscales"):
        wsi.open_slide(tmp_path / "g.zarr")
    f = zarr.create_array(str(tmp_path / "f.zarr"), shape=(64, 64, 3), chunks=(32, 32, 3), dtype="float32")
    with pytest.raises(UnsupportedSlideError, match="uint8"):
        wsi.open_slide(tmp_path / "f.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(UnsupportedSlideError, match="not a Zarr store"):
        ZarrBackend(str(tmp_path / "empty.zarr"))
    del f


def test_converted_store_metadata_and_associated(small_store):
    with wsi.open_slide(small_store) as s, wsi.open_slide(DEMO_SLIDE) as src:
        assert s.mpp == pytest.approx(src.mpp)
        assert s.level_downsamples == (1.0, 4.0)
        assert s.level_dimensions[1] == (555, 741)
        assert s.properties["aperio.AppMag"] == src.properties["aperio.AppMag"]
        assert sorted(s.associated_images) == sorted(src.associated_images)
        for name in s.associated_images:
            assert np.array_equal(s.associated_images[name], src.associated_images[name])


def test_bioformats2raw_5d_v2_layout(tmp_path, pixels):
    """bioformats2raw writes series 0 as NGFF 0.4 t,c,z,y,x with one channel per chunk (read
    through zarr-python: chunks split along the channel axis)."""
    root = zarr.open_group(str(tmp_path / "b.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    series = root.create_group("0")
    data = np.ascontiguousarray(pixels.transpose(2, 0, 1))[None, :, None]  # (1, 3, 1, h, w)
    series.create_array("0", data=data, chunks=(1, 1, 1, 256, 256))
    axes = [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space"},
        {"name": "y", "type": "space", "unit": "nanometer"},
        {"name": "x", "type": "space", "unit": "nanometer"},
    ]
    series.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 250, 250]}]}
            ],
        }
    ]
    with wsi.open_slide(tmp_path / "b.zarr") as s:
        assert s.dimensions == (900, 700) and s.mpp == pytest.approx(0.25)
        assert np.array_equal(s.read_region((30, 40), 0, (300, 200)), pixels[40:240, 30:330])


def test_malformed_metadata_is_a_corrupt_slide(tmp_path, small_store):
    import shutil

    from wsi.errors import CorruptSlideError

    store = tmp_path / "m.zarr"
    shutil.copytree(small_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["ome"]["multiscales"][0]["datasets"]
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptSlideError, match="m.zarr"):
        wsi.open_slide(store)
    (store / "zarr.json").write_text("{not json")
    with pytest.raises(CorruptSlideError, match="not valid JSON"):
        wsi.open_slide(store)


def test_open_shard_files_are_bounded(tmp_path, pixels, monkeypatch):
    import wsi.byteio

    monkeypatch.setattr(wsi.byteio, "MAX_OPEN_FILES", 3)
    out = convert(
        DEMO_SLIDE, tmp_path / "many.zarr", tile=64, shard_tiles=1, codec="zstd", levels=(1,), progress=False
    )
    with wsi.open_slide(out) as z, wsi.open_slide(DEMO_SLIDE) as src:
        locs = [(x, y) for x in range(0, 640, 64) for y in range(0, 384, 64)]  # 60 shard files
        for got, loc in zip(z.read_regions(locs, 0, (64, 64), threads=2), locs):
            assert np.array_equal(got, src.read_region(loc, 0, (64, 64)))
        assert len(z._b._io._fds) <= 3
        assert np.array_equal(
            z.read_region((10, 10), 0, (300, 200)), src.read_region((10, 10), 0, (300, 200))
        )
