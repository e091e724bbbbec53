"""``slidestream embed``'s decode options: ``decode=gpu`` (encoded tiles decoded in batches on the
encoder's device; run here on the CPU through torchvision's libjpeg, the same code path) gives the
same encoder inputs as the CPU decode, and asking for it without a CUDA encoder is a config error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EMBED_ARCH, make_embed_slide

from models.encoders import load_encoder
from pipelines.embed import Job, embed_slides, grid, open_with_mpp, resolve, slide_mask, tile_batches
from pipelines.errors import ConfigError


def test_gpu_decode_path_gives_the_cpu_inputs(tmp_path):
    path = make_embed_slide(tmp_path / "s.svs", size=(768, 640))
    spec = resolve(str(path), None)[0]
    enc = load_encoder(EMBED_ARCH, torch.device("cpu"))
    job = Job(out_dir=tmp_path, mpp=1.0, tile_size=64, batch_size=16, tissue_method="otsu", min_tissue=0.1,
              mpp_override=None, read_threads=2, hash_slides=False, max_failed_tiles=0.05,
              progress=False)  # fmt: skip
    slide, base, _ = open_with_mpp(spec.url, spec.mpp, job)
    with slide:
        mask = slide_mask(slide, spec, job.tissue_method)
        records = grid(spec.slide_id, slide, mask, base_mpp=base, mpp=1.0, tile_size=64, min_tissue=0.1)
    cpu = list(tile_batches(spec, len(records), mask, base, job, enc))
    gpu = list(tile_batches(spec, len(records), mask, base, dataclasses.replace(job, decode="gpu"), enc))
    assert sum(len(b.x) for b in cpu) == len(records) > 16
    for a, b in zip(cpu, gpu, strict=True):
        assert (a.coords == b.coords).all()
        assert torch.equal(a.x, b.x)  # 2x box averages of whole tiles: bit-exact
    st = gpu[-1].read_stats
    assert st["delivered_tiles"] == len(records) and st["decoded_tiles"] == len(records)  # grid on the tiles


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_gpu_decode_needs_a_cuda_encoder(tmp_path):
    path = make_embed_slide(tmp_path / "s.svs")
    with pytest.raises(ConfigError, match="decode=gpu"):
        embed_slides(str(path), EMBED_ARCH, out=tmp_path / "out", decode="gpu", device="cpu", progress=False)
