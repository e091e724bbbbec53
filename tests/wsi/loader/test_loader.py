"""wsi.loader: the online tile stream on generated slides built from real pixels.

Slides are real pyramidal TIFFs written by wsi.synth and read through the real backends; the
DataLoader tests start real spawn workers.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi.loader import SlideSpec, TileDataset, make_loader, mosaic, resolve_slides, save_mosaic_per_mpp
from wsi.sampling import tile_list_order
from wsi.slide import open_slide
from wsi.synth import mirror_tile, write_tiff_pyramid


def _pink_noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lo, hi = np.array([170, 80, 150]), np.array([230, 140, 210])
    return (lo + rng.random((h, w, 3)) * (hi - lo)).astype(np.uint8)


def _corrupt_level0(path: Path) -> None:
    """Break every level-0 JPEG tile (the directory and lower levels stay readable)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        offs, counts = tf.pages[0].dataoffsets, tf.pages[0].databytecounts
    with open(path, "r+b") as f:
        for o, c in zip(offs, counts):
            if c > 16:
                f.seek(o + 2)
                f.write(b"\x00" * 8)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, demo_pixels) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("archive")
    # tissue in the left half only, 0.5 µm/px, levels 1, 4, 16
    half = np.full((1536, 2048, 3), 245, np.uint8)
    half[:, :1024] = _pink_noise(1536, 1024)
    write_tiff_pyramid(d / "half.svs", half, downsamples=(1, 4, 16), mpp=0.5)
    # real H&E pixels (the shipped CC0 slide, mirrored), stated as 0.25 µm/px, levels 1, 4
    real = mirror_tile(demo_pixels, (3000, 3000))
    write_tiff_pyramid(d / "real.svs", real, downsamples=(1, 4), mpp=0.25)
    # a coarse slide: finest level 1.0 µm/px
    write_tiff_pyramid(d / "coarse.svs", real[:1200, :1200], downsamples=(1, 4), mpp=1.0)
    # broken slides: level-0 tiles damaged (opens, thumbnail fine) and a file that is no slide
    bad = d / "bad" / "damaged.svs"
    bad.parent.mkdir()
    write_tiff_pyramid(bad, half, downsamples=(1, 4, 16), mpp=0.5)
    _corrupt_level0(bad)
    junk = d / "bad" / "junk.svs"
    junk.write_bytes(np.random.default_rng(0).integers(0, 255, 1001, dtype=np.uint8).tobytes())
    return {
        "dir": d,
        "half": d / "half.svs",
        "real": d / "real.svs",
        "coarse": d / "coarse.svs",
        "bad": bad,
        "junk": junk,
    }


def _items(ds) -> list[dict]:
    return list(ds)


def test_resolve_slides_sources(archive, tmp_path):
    d = archive["dir"]
    assert [s.slide_id for s in resolve_slides(d)] == ["coarse", "half", "real"]
    assert [s.slide_id for s in resolve_slides(str(d / "h*.svs"))] == ["half"]
    specs = resolve_slides([archive["half"], SlideSpec(str(archive["real"]), "r1", mpp=0.3)])
    assert [(s.slide_id, s.mpp) for s in specs] == [("half", None), ("r1", 0.3)]
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "slide_id", "mpp", "mask"])
        w.writerow([str(archive["half"]), "", "", ""])
        w.writerow(["rel.svs", "x1", "0.5", "m.png"])
    specs = resolve_slides(man)
    assert specs[0] == SlideSpec(str(archive["half"]))
    assert (specs[1].url, specs[1].slide_id, specs[1].mpp, specs[1].mask) == (
        str(tmp_path / "rel.svs"),
        "x1",
        0.5,
        str(tmp_path / "m.png"),
    )
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/arch/a.svs", b"x")
    fs.pipe("/arch/b.tiff", b"x")
    fs.pipe("/arch/notes.txt", b"x")
    assert [s.url for s in resolve_slides("memory://arch")] == [
        "memory:///arch/a.svs",
        "memory:///arch/b.tiff",
    ]
    assert resolve_slides([archive["half"], archive["half"]]) == [SlideSpec(str(archive["half"]))]  # once
    with pytest.raises(ValueError, match="both given the id"):
        resolve_slides([SlideSpec(str(archive["half"]), "x"), SlideSpec(str(archive["real"]), "x")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_slides(tmp_path / "nope")
    with pytest.raises(ValueError, match="no slides found"):
        resolve_slides(tmp_path / "empty*.svs")


def test_multi_mpp_tiles_match_read_region_mpp(archive):
    ds = TileDataset(
        archive["real"], mode="random", samples_per_epoch=48, seed=1, read_threads=2, prefetch=16
    )
    items = _items(ds)
    assert len(items) == 48 and ds.errors["tile_errors"] == 0
    assert {round(float(it["mpp"]), 3) for it in items} == {0.25, 0.5, 1.0, 2.0}
    with open_slide(archive["real"]) as s:
        for it in items[:24]:
            assert it["image"].dtype == torch.uint8 and it["image"].shape == (3, 224, 224)
            assert it["coords"].dtype == torch.int64 and it["mpp"].dtype == torch.float32
            x, y = it["coords"].tolist()
            ref = s.read_region_mpp((x, y), (224, 224), float(it["mpp"]))
            np.testing.assert_array_equal(it["image"].permute(1, 2, 0).numpy(), ref)


def test_tiles_only_from_tissue(archive):
    W = 2048
    for mode in ("random", "grid"):
        ds = TileDataset(
            archive["half"], mode=mode, mpps=(0.5, 1.0, 2.0), samples_per_epoch=200, min_tissue=0.5
        )
        items = _items(ds)
        assert len(items) > 20
        for it in items:
            x, _ = it["coords"].tolist()
            size0 = 224 * float(it["mpp"]) / 0.5
            assert x + 0.5 * size0 <= W / 2 + 8  # at least half the tile lies in the left (tissue) half
            img = it["image"].numpy()
            assert (img.min(axis=0) < 200).mean() >= 0.4  # pink noise, not white background


def test_coarse_slide_mpp_policy(archive):
    skip = _items(TileDataset(archive["coarse"], mpps=(0.5, 1.0), samples_per_epoch=30, tissue_method=None))
    assert len(skip) == 30 and {float(it["mpp"]) for it in skip} == {1.0}
    up = _items(
        TileDataset(
            archive["coarse"], mpps=(0.5, 1.0), samples_per_epoch=30, tissue_method=None, upsample=True
        )
    )
    assert {float(it["mpp"]) for it in up} == {0.5, 1.0}
    it = next(i for i in up if float(i["mpp"]) == 0.5)
    with open_slide(archive["coarse"]) as s:
        ref = s.read_region_mpp(it["coords"].tolist(), (224, 224), 0.5)
    np.testing.assert_array_equal(it["image"].permute(1, 2, 0).numpy(), ref)


def test_broken_slides_are_counted_and_quarantined(archive, caplog):
    from wsi.tissue import tissue_mask

    # the damaged slide's mask is given (its thumbnail would come from the damaged level 0)
    masks = {"damaged": tissue_mask(archive["half"], method="otsu")}
    ds = TileDataset(
        [archive["half"], archive["bad"], archive["junk"]],
        mpps=(0.5,),
        samples_per_epoch=150,
        quarantine_after=3,
        seed=0,
        masks=masks,
    )
    with caplog.at_level("WARNING", logger="wsi.loader"):
        items = _items(ds)
    err = ds.errors
    assert {it["slide_id"] for it in items} == {"half"} and len(items) > 50
    assert err["slide_errors"] == 1 and err["tile_errors"] >= 3
    assert sorted(err["quarantined"]) == ["damaged", "junk"]
    assert err["skipped"] > 0  # later draws of the damaged slide were dropped
    # every sampled position of the epoch is yielded, failed or skipped (never a blank tile)
    assert len(items) + err["tile_errors"] + err["skipped"] == 150
    assert any("quarantined" in r.message for r in caplog.records)


def test_stream_over_http_equals_local(archive):
    from httpserver import serve

    kw = dict(mode="grid", mpps=(1.0, 2.0), tile_size=112, thumbnail_size=256)
    local = _items(TileDataset([archive["half"], archive["real"]], **kw))
    with serve(archive["dir"]) as srv:
        ds = TileDataset([srv.url("half.svs"), srv.url("real.svs")], **kw)
        remote = _items(ds)
        ranged = [r for r in srv.requests if r.range is not None and r.status == 206]
    assert ranged and ds.errors["tile_errors"] == 0 and len(remote) == len(local) > 20
    for a, b in zip(local, remote):
        assert a["slide_id"] == b["slide_id"] and a["coords"].tolist() == b["coords"].tolist()
        assert torch.equal(a["image"], b["image"])


def test_mask_from_slide_spec_path(archive, tmp_path):
    from wsi.tissue import TissueMask

    m = np.zeros((300, 300), bool)
    m[:, :100] = True  # tissue declared in the left third of real.svs (3000 x 3000)
    path = TissueMask(m, 10.0, method="user", slide_dimensions=(3000, 3000)).save(tmp_path / "real-mask.png")
    ds = TileDataset(
        SlideSpec(str(archive["real"]), mask=str(path)), mpps=(0.5,), samples_per_epoch=40, min_tissue=0.9
    )
    items = _items(ds)
    xs = [int(it["coords"][0]) for it in items]
    assert len(items) == 40 and max(xs) + 0.9 * 448 <= 1000 + 10  # >= 90 % inside the declared third


def _run(loader, n=None):
    """(slide ids, coords, mpps) of the next ``n`` batches (all when None); takes no more than n."""
    it = iter(loader)
    out = [(b["slide_id"], b["coords"].tolist(), b["mpp"].tolist()) for b in islice(it, n)]
    it.close()
    return out


@pytest.mark.parametrize("mode", ["random", "grid"])
def test_state_dict_resume_is_exact(archive, mode):
    slides = [archive["half"], archive["real"]]
    kw = dict(
        mode=mode,
        mpps=(0.5, 1.0),
        samples_per_epoch=None if mode == "grid" else 400,
        seed=5,
        rank=1,
        world_size=2,
        max_open=1,
        thumbnail_size=256,
        tile_size=112,
    )
    a = make_loader(TileDataset(slides, **kw), batch_size=4, num_workers=0)
    a.set_epoch(2)
    it = iter(a)
    first = [next(it) for _ in range(5)]
    state = a.state_dict()
    cont = [(b["slide_id"], b["coords"].tolist(), b["mpp"].tolist()) for b in (next(it) for _ in range(4))]
    it.close()
    b = make_loader(TileDataset(slides, **kw), batch_size=4, num_workers=0)
    b.load_state_dict(state)
    b.set_epoch(2)  # the same epoch keeps the position
    assert _run(b, 4) == cont
    assert all(len(x["slide_id"]) == 4 for x in first)
    if mode == "random":
        assert len(a) == 100  # 400 samples per rank, batches of 4
    fresh = make_loader(TileDataset(slides, **kw), batch_size=4, num_workers=0)
    fresh.set_epoch(2)
    assert _run(fresh, 9)[5:] == cont  # and the whole thing equals an uninterrupted run
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(TileDataset(slides, **kw), batch_size=4, num_workers=2).load_state_dict(state)


def test_given_tile_list_in_order_shuffled_sharded_and_resumed(archive):
    """``tiles=``: exactly the listed tiles (pixels of read_region_mpp), each carrying its list
    position; grid mode in list order, random mode a new permutation per epoch with equal shards;
    two ranks partition an epoch; resume continues exactly."""
    tiles = [("real", 150 * i, 90 * (i % 7), 0.5 if i % 2 else 1.0) for i in range(23)]
    kw = dict(tile_size=64, tissue_method=None, seed=4, thumbnail_size=256)
    grid = _items(TileDataset(archive["real"], mode="grid", tiles=tiles, **kw))
    assert [it["tile"] for it in grid] == list(range(23))
    with open_slide(archive["real"]) as s:
        for it in grid[:6]:
            sid, x, y, mpp = tiles[it["tile"]]
            assert it["coords"].tolist() == [x, y] and float(it["mpp"]) == mpp
            ref = s.read_region_mpp((x, y), (64, 64), mpp)
            np.testing.assert_array_equal(it["image"].permute(1, 2, 0).numpy(), ref)
    ranks = []
    for r in (0, 1):
        ds = TileDataset(archive["real"], mode="random", tiles=tiles, rank=r, world_size=2, **kw)
        ds.set_epoch(3)
        ranks.append([it["tile"] for it in _items(ds)])
    assert len(ranks[0]) == len(ranks[1]) == 11 and not set(ranks[0]) & set(ranks[1])
    ds = TileDataset(archive["real"], mode="random", tiles=tiles, **kw)
    ds.set_epoch(3)
    one = [it["tile"] for it in _items(ds)]
    assert sorted(one) == list(range(23)) and one != list(range(23))
    assert one[0::2][:11] == ranks[0] and one[1::2][:11] == ranks[1]  # one permutation, cut in shards
    ds.set_epoch(4)
    assert [it["tile"] for it in _items(ds)] != one
    a = make_loader(
        TileDataset(archive["real"], mode="random", tiles=tiles, **kw), batch_size=4, num_workers=0
    )
    it = iter(a)
    first = [next(it)["tile"].tolist() for _ in range(2)]
    state = a.state_dict()
    rest = [b["tile"].tolist() for b in it]
    b = make_loader(
        TileDataset(archive["real"], mode="random", tiles=tiles, **kw), batch_size=4, num_workers=0
    )
    b.load_state_dict(state)
    assert [x["tile"].tolist() for x in b] == rest
    assert sum(first + rest, []) == tile_list_order(23, shuffle=True, seed=4, epoch=0).tolist()
    with pytest.raises(ValueError, match="not in the slide list"):
        TileDataset(archive["real"], tiles=[("other", 0, 0, 1.0)], **kw)


_SPAWN_KW = dict(mode="grid", mpps=(0.5, 1.0), tile_size=112, quarantine_after=2, seed=0, thumbnail_size=256)


def test_two_spawn_workers_same_tiles_as_in_process(archive):
    slides = [archive["half"], archive["bad"], archive["real"]]
    ref = _run(make_loader(TileDataset(slides, **_SPAWN_KW), batch_size=16, num_workers=0))
    ref_tiles = Counter((s, tuple(c), m) for b in ref for s, c, m in zip(*b))
    assert len(ref_tiles) > 100 and sum(ref_tiles.values()) == len(ref_tiles)
    loader = make_loader(TileDataset(slides, **_SPAWN_KW), batch_size=16, num_workers=2)
    got = _run(loader)
    assert Counter((s, tuple(c), m) for b in got for s, c, m in zip(*b)) == ref_tiles
    # each worker quarantines the damaged slide after 2 errors; the counts reach the parent
    errs = loader.errors
    assert errs["quarantined"] == ["damaged"] and errs["tile_errors"] == 4 and errs["slide_errors"] == 0


@pytest.mark.slow
def test_two_forkserver_workers_resume_over_http(archive):
    from httpserver import serve

    with serve(archive["dir"]) as srv:
        _forkserver_resume([srv.url("half.svs"), srv.url("real.svs")])


def _forkserver_resume(slides):
    loader = make_loader(
        TileDataset(slides, **_SPAWN_KW), batch_size=16, num_workers=2, multiprocessing_context="forkserver"
    )
    got, state, cont = [], None, []
    for i, b in enumerate(loader):
        got.append((b["slide_id"], b["coords"].tolist(), b["mpp"].tolist()))
        if i == 2:
            state = loader.state_dict()  # odd batch count: worker 1 is next
        elif i > 2:
            cont.append(got[-1])
    assert len(cont) >= 3
    resumed = make_loader(
        TileDataset(slides, **_SPAWN_KW), batch_size=16, num_workers=2, multiprocessing_context="forkserver"
    )
    resumed.load_state_dict(state)
    assert _run(resumed) == cont


@pytest.mark.slow
def test_persistent_workers_follow_epochs(archive):
    slides = [archive["half"], archive["real"]]
    kw = dict(mode="random", mpps=(0.5, 1.0), samples_per_epoch=48, seed=2, thumbnail_size=256)

    def loader():
        return make_loader(
            TileDataset(slides, **kw), batch_size=8, num_workers=2, multiprocessing_context="forkserver"
        )

    a = loader()
    e0 = _run(a)
    a.set_epoch(1)
    e1 = _run(a)  # the same (persistent) workers, told the new epoch through shared memory
    assert sum(len(b[0]) for b in e0) == sum(len(b[0]) for b in e1) == 48 and e0 != e1
    b = loader()
    b.set_epoch(1)
    assert _run(b) == e1
    a.set_epoch(2)
    part = _run(a, 2)
    state = a.state_dict()
    rest = _run(a)  # re-iterating a persistent loader continues where the last iteration stopped
    c = loader()
    c.load_state_dict(state)
    assert _run(c) == rest and len(part) + len(rest) == 6


def test_mosaic_and_per_mpp_png(archive, tmp_path):
    batch = torch.zeros((5, 3, 10, 12), dtype=torch.uint8)
    m = mosaic(batch, ncols=2, pad=1)
    assert m.shape == (3 * 10 + 4, 2 * 12 + 3, 3) and m.dtype == np.uint8
    assert m[0, 0].tolist() == [255, 255, 255] and m[1, 1].tolist() == [0, 0, 0]
    out = tmp_path / "mosaic.png"
    shown = save_mosaic_per_mpp(TileDataset(archive["real"], thumbnail_size=256), out, per_mpp=3)
    assert shown == {0.25: 3, 0.5: 3, 1.0: 3, 2.0: 3}
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 3 * 224


@pytest.mark.slow
def test_memory_flat_over_a_long_stream(archive):
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc (Linux)")

    def rss_mb() -> float:
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    ds = TileDataset(
        [archive["half"], archive["real"]], mpps=(0.25, 0.5, 1.0, 2.0), thumbnail_size=256, max_open=1, seed=3
    )  # endless stream; max_open=1 also churns slide handles
    rss = []
    for i, _ in enumerate(ds):
        if i % 100 == 0:
            rss.append(rss_mb())
        if i == 2000:
            break
    assert max(rss[-5:]) - max(rss[2:7]) < 40, rss


def _thread_names() -> list[str]:
    import os

    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return sorted(names)


def _ddp_worker(out: Path, init: str) -> None:
    """Run under torchrun: rank and world size come from torch.distributed. ``init``: ``user`` (a
    library user's own ``init_process_group``) or ``pipelines`` (``init_distributed``, then timm
    imported, as the training jobs do)."""
    import json

    import torch.distributed as dist
    from conftest import DEMO_SLIDE

    if init == "user":
        dist.init_process_group("gloo")
    else:
        from pipelines.training.distributed import init_distributed

        init_distributed("cpu")
        import timm  # noqa: F401 - imports torch._dynamo after the process group exists
    rank = dist.get_rank()
    # the default mask method (the tissue U-Net), computed in this process
    ds = TileDataset(DEMO_SLIDE, mode="grid", mpps=(0.5,), tile_size=112, thumbnail_size=256)
    coords = [c for b in make_loader(ds, batch_size=8, num_workers=0) for c in b["coords"].tolist()]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": ds.rank, "world": ds.world_size, "coords": coords})
    dist.barrier()
    dist.destroy_process_group()
    # the process group's threads are gone once it is destroyed: left running, they can abort the
    # process at interpreter exit (a gloo thread freeing a tensor after Python has finalised)
    result = {"ranks": gathered, "threads_after_destroy": _thread_names()}
    (out / f"ddp-{init}-{rank}.json").write_text(json.dumps(result))


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("init", ["user", "pipelines"])
def test_ddp_ranks_split_the_grid(tmp_path, demo_slide, init):
    import json

    from conftest import torchrun

    proc = torchrun(__file__, str(tmp_path), init)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"ddp-{init}-{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        assert not [t for t in res["threads_after_destroy"] if "gloo" in t], res["threads_after_destroy"]
    got = results[0]["ranks"]
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]
    full = _items(TileDataset(demo_slide, mode="grid", mpps=(0.5,), tile_size=112, thumbnail_size=256))
    want = sorted(tuple(it["coords"].tolist()) for it in full)
    mine = [tuple(c) for g in got for c in g["coords"]]
    assert sorted(mine) == want and len(want) > 100
    assert abs(len(got[0]["coords"]) - len(got[1]["coords"])) <= 1


if __name__ == "__main__":  # the torchrun worker of test_ddp_ranks_split_the_grid
    _ddp_worker(Path(sys.argv[1]), sys.argv[2])
