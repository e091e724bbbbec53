"""wsi.loader decoding less: aligned streams, scaled decode, the per-process tile cache, the read
counters, and the GPU decode path (decode="gpu") — run on the CPU through torchvision's libjpeg,
which exercises the same byte handling, pasting, cropping and resizing as nvJPEG; the comparison on
a CUDA device skips without one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi.loader import RawTile, TileDataset, decode_raw_tiles, make_loader
from wsi.synth import mirror_tile, write_tiff_pyramid

MPPS = (0.25, 0.5, 1.0, 2.0)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, demo_pixels) -> dict[str, str]:
    d = tmp_path_factory.mktemp("loaderdecode")
    img = mirror_tile(demo_pixels, (3072, 3072))
    out = {}
    for name, rgb in (("rgb", True), ("ycbcr", False)):
        write_tiff_pyramid(d / f"{name}.svs", img, tile=256, downsamples=(1, 4), mpp=0.25, jpeg_rgb=rgb)
        out[name] = str(d / f"{name}.svs")
    return out


def _stream(path, n=96, workers=0, device="cpu", **kw):
    ds = TileDataset([path], mpps=kw.pop("mpps", MPPS), samples_per_epoch=n, seed=5, read_threads=1, **kw)
    loader = make_loader(ds, batch_size=32, num_workers=workers, decode_device=device)
    batches = list(loader)
    return batches, loader.read_stats


def test_aligned_and_scaled_streams_decode_less(slides):
    plain, s_plain = _stream(slides["rgb"])
    aligned, s_al = _stream(slides["rgb"], aligned=True)
    scaled, s_sc = _stream(slides["rgb"], aligned=True, scaled_decode=True)
    n = sum(len(b["image"]) for b in plain)
    assert n == 96 and s_plain["delivered_tiles"] == 96 and s_plain["delivered_px"] == 96 * 224 * 224
    # unaligned: ~3.5 tiles per native read, ~7.6 per 2x read; aligned: 1 and 4; scaled: 1 and 4 quarters
    assert s_plain["decoded_per_delivered"] > 5
    assert 2.5 < s_al["decoded_per_delivered"] < 4.0
    assert s_sc["decoded_per_delivered"] == pytest.approx(256 * 256 / (224 * 224))  # exactly one tile each
    assert s_plain["cache_hit_rate"] is None  # random streams: no cache
    # same stream positions with and without scaled decode; pixels within the stated tolerance
    for a, b in zip(aligned, scaled):
        assert (a["coords"] == b["coords"]).all()
        d = (a["image"].int() - b["image"].int()).abs().float()
        assert d.mean() < 0.5


def test_grid_cache_hits_and_pixels(slides):
    kw = {"mode": "grid", "mpps": (0.25,), "tissue_method": None, "overlap": 112}
    cached, st = _stream(slides["rgb"], n=None, **kw)
    plain, st0 = _stream(slides["rgb"], n=None, tile_cache_mb=0, **kw)
    assert st0["cache_hit_rate"] is None and st["cache_hit_rate"] > 0.5
    assert st["cache_hits"] + st["cache_misses"] > st["decoded_tiles"]
    assert st["decoded_tiles"] == st["cache_misses"] < st0["decoded_tiles"] / 2
    for a, b in zip(cached, plain):
        assert torch.equal(a["image"], b["image"])


@pytest.mark.parametrize("coding", ["rgb", "ycbcr"])
def test_gpu_path_on_cpu_equals_the_cpu_decode(slides, coding):
    mpps = (0.25, 0.5, 1.0, 2.0, 0.35)  # 0.35: a bilinear resize
    cpu, _ = _stream(slides[coding], mpps=mpps)
    raw, st = _stream(slides[coding], mpps=mpps, decode="gpu")
    assert st["decoded_tiles"] > 0 and st["delivered_tiles"] == 96
    for a, b in zip(cpu, raw):
        assert (a["coords"] == b["coords"]).all() and b["image"].dtype == torch.uint8
        d = (a["image"].int() - b["image"].int()).abs().flatten(1).amax(1)
        exact = a["mpp"] != np.float32(0.35)
        assert (d[exact] == 0).all()  # whole tiles and 2x/4x/8x box averages: bit-exact
        assert (d[~exact] <= 1).all()  # antialiased bilinear: PIL vs torch rounding


def test_gpu_path_through_a_worker_process(slides):
    cpu, _ = _stream(slides["rgb"], n=64, aligned=True)
    raw, st = _stream(slides["rgb"], n=64, aligned=True, decode="gpu", workers=1)
    assert st["delivered_tiles"] == 64
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(cpu, raw))


def test_raw_tile_white_sparse_and_decoded_fallback():
    px = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    sparse = RawTile(8, [b"", b"", b"", b""], False, 2, 2, 8, 8, (4, 4, 8, 8))
    out = decode_raw_tiles([RawTile(8, pixels=px), sparse], "cpu")
    assert torch.equal(out[0], torch.from_numpy(px)) and (out[1] == 255).all()
    with pytest.raises(ValueError, match="same output size"):
        decode_raw_tiles([RawTile(8, pixels=px), RawTile(4, pixels=px[:, :4, :4])], "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_gpu_decode_without_cuda_is_a_clear_error(slides):
    ds = TileDataset([slides["rgb"]], mpps=(0.5,), samples_per_epoch=8, decode="gpu")
    with pytest.raises(ValueError, match="CUDA"):
        make_loader(ds, batch_size=8, num_workers=0)
    with pytest.raises(ValueError, match="decode"):
        TileDataset([slides["rgb"]], decode="nvjpeg")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
@pytest.mark.parametrize("coding", ["rgb", "ycbcr"])
def test_gpu_decode_matches_cpu_within_idct_tolerance(slides, coding):
    """nvJPEG vs libjpeg-turbo: mean |Δ| ≤ 1.0 and 99.9th percentile ≤ 8 levels (wsi.loader.gpu)."""
    cpu, _ = _stream(slides[coding], n=128)
    gpu, _ = _stream(slides[coding], n=128, decode="gpu", device="cuda")
    d = torch.cat([(a["image"].int() - b["image"].cpu().int()).abs().flatten() for a, b in zip(cpu, gpu)])
    assert gpu[0]["image"].device.type == "cuda"
    assert d.float().mean() <= 1.0 and torch.quantile(d.float()[:: max(1, len(d) // 10**6)], 0.999) <= 8


def test_gpu_path_checks_declared_sizes_before_any_decoder(tmp_path, demo_pixels):
    """A tile whose JPEG frame header declares another size is refused in the worker (counted as a
    tile error), never handed to nvJPEG, which would allocate what the stream declares."""
    import tifffile

    p = tmp_path / "lying.svs"
    write_tiff_pyramid(p, mirror_tile(demo_pixels, (1024, 1024)), tile=256, downsamples=(1, 4), mpp=0.25)
    with tifffile.TiffFile(p) as tf:
        off, n = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    with open(p, "r+b") as f:
        f.seek(off)
        data = bytearray(f.read(n))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 7] = (4096).to_bytes(2, "big")  # height 256 -> 4096
        f.seek(off)
        f.write(data)
    ds = TileDataset([str(p)], mode="grid", mpps=(0.25,), tile_size=256, tissue_method=None, decode="gpu")
    loader = make_loader(ds, batch_size=16, num_workers=0, decode_device="cpu")
    n = sum(len(b["image"]) for b in loader)
    assert n == 15 and loader.errors["tile_errors"] == 1
    assert "declares 256x4096" in loader.errors["first_error"]
