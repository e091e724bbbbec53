"""wsi.loader transport: reused shared-memory image slots (wsi.loader.shm) between persistent
workers and the TileLoader, and channels-last delivery. Real spawn workers, real slides written
by wsi.synth from the demo's pixels."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wsi.loader import TileDataset, collate_tiles, make_loader
from wsi.synth import mirror_tile, write_tiff_pyramid

KW = dict(mode="random", mpps=(0.5, 1.0), tile_size=64, samples_per_epoch=96, seed=3, thumbnail_size=256)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, demo_pixels) -> list[str]:
    d = tmp_path_factory.mktemp("transport")
    out = []
    for i, px in enumerate((demo_pixels, demo_pixels[::-1])):
        p = d / f"s{i}.svs"
        write_tiff_pyramid(
            p, mirror_tile(np.ascontiguousarray(px), (1536, 1536)), downsamples=(1, 4), mpp=0.5
        )
        out.append(str(p))
    return out


def _epoch(loader) -> list[dict]:
    return [{k: v for k, v in b.items()} for b in loader]


def _key(batches) -> list[tuple]:
    return [(b["slide_id"], b["coords"].tolist(), b["mpp"].tolist()) for b in batches]


def _images(batches) -> list[np.ndarray]:
    return [b["image"].contiguous().numpy() for b in batches]


def _check_pixels(slides, batches) -> None:
    from wsi.slide import open_slide

    opened = {f"s{i}": open_slide(p) for i, p in enumerate(slides)}
    try:
        for b in batches:
            assert b["image"].dtype == torch.uint8 and b["coords"].dtype == torch.int64
            assert b["mpp"].dtype == torch.float32
            for s, c, m, img in zip(b["slide_id"], b["coords"].tolist(), b["mpp"].tolist(), b["image"]):
                want = opened[s].read_region_mpp(c, (64, 64), m, allow_upsample=False)
                np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), want)
    finally:
        for o in opened.values():
            o.close()


def test_reused_slots_give_the_same_batches_kept_intact_over_epochs(slides):
    """Persistent workers stacking into reused slots: the same tiles and pixels as the ordinary
    transport and as reading in-process, over two epochs, with every batch of both epochs kept
    (a slot reused for a later batch must not change an earlier one)."""
    ref = make_loader(TileDataset(slides, **KW), batch_size=16, num_workers=0)
    plain = make_loader(TileDataset(slides, **KW), batch_size=16, num_workers=2, reuse_shared_memory=False)
    reuse = make_loader(TileDataset(slides, **KW), batch_size=16, num_workers=2)
    kept: dict[str, list] = {"ref": [], "plain": [], "reuse": []}
    for epoch in (0, 1):
        for name, loader in (("ref", ref), ("plain", plain), ("reuse", reuse)):
            loader.set_epoch(epoch)
            kept[name].append(_epoch(loader))
    assert reuse._buffers is not None and plain._buffers is None
    for epoch in (0, 1):
        r, p, u = kept["ref"][epoch], kept["plain"][epoch], kept["reuse"][epoch]
        assert sum(len(b["slide_id"]) for b in u) == 96
        # workers interleave their batches in a fixed order, so plain and reused match batch for batch
        assert _key(u) == _key(p)
        for a, b in zip(_images(u), _images(p)):
            np.testing.assert_array_equal(a, b)
        # and every tile has the pixels of a direct read
        _check_pixels(slides, u)
        _check_pixels(slides, r)
    assert _key(kept["reuse"][0]) != _key(kept["reuse"][1])


def test_early_break_then_next_epoch(slides):
    """Stopping mid-epoch leaves slots with batches the DataLoader discards; the next epoch starts
    with every slot free and gives what a fresh loader gives."""
    a = make_loader(TileDataset(slides, **KW), batch_size=8, num_workers=2)
    it = iter(a)
    first = [next(it) for _ in range(3)]
    it.close()
    a.set_epoch(1)
    got = _epoch(a)
    b = make_loader(TileDataset(slides, **KW), batch_size=8, num_workers=2, reuse_shared_memory=False)
    b.set_epoch(1)
    want = _epoch(b)
    assert _key(got) == _key(want) and len(first) == 3
    for x, y in zip(_images(got), _images(want)):
        np.testing.assert_array_equal(x, y)


def test_channels_last_same_values_other_layout(slides):
    """channels_last=True: the same pixels, (B, 3, S, S) in torch.channels_last memory format, in
    process and through workers (reused slots and the ordinary transport); items are views."""
    kw = dict(KW, samples_per_epoch=48)
    item = next(iter(TileDataset(slides, channels_last=True, **kw)))
    assert item["image"].shape == (3, 64, 64) and not item["image"].is_contiguous()
    for workers, reuse in ((0, True), (2, True), (2, False)):
        loader = make_loader(
            TileDataset(slides, channels_last=True, **kw), batch_size=16, num_workers=workers,
            reuse_shared_memory=reuse,
        )  # fmt: skip
        got = _epoch(loader)
        contiguous = _epoch(make_loader(TileDataset(slides, **kw), batch_size=16, num_workers=workers))
        assert _key(got) == _key(contiguous)
        for b, c in zip(got, contiguous):
            img = b["image"]
            assert img.shape == (len(b["slide_id"]), 3, 64, 64) and img.dtype == torch.uint8
            assert img.is_contiguous(memory_format=torch.channels_last) and not img.is_contiguous()
            assert c["image"].is_contiguous() and torch.equal(img, c["image"])
        _check_pixels(slides, got)


def test_buffers_stay_with_the_tileloader(slides):
    """A plain DataLoader (or pickle) over a dataset a TileLoader used never sees the slots."""
    ds = TileDataset(slides, **dict(KW, samples_per_epoch=32))
    tl = make_loader(ds, batch_size=16, num_workers=2)
    assert len(_epoch(tl)) == 2 and ds._batch_buffers is tl._buffers is not None
    state = pickle.loads(pickle.dumps(ds))
    assert state._batch_buffers is None
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(tl._buffers)
    dl = DataLoader(
        ds, batch_size=16, num_workers=1, collate_fn=collate_tiles, multiprocessing_context="spawn"
    )
    batches = list(dl)
    assert batches and all("image" in b and "_buf" not in b for b in batches)
    assert all(b["image"].shape == (16, 3, 64, 64) for b in batches)
