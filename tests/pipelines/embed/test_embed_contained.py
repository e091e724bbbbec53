"""The archive test of issue 12: ``slidestream embed`` over an archive holding a native-crash file, a
file that exhausts the worker's memory, a looping IFD chain, decompression bombs, a file that never
delivers a byte and good slides. The job finishes; the good slides are embedded; every bad file has
a manifest row with its error class; a rerun does not crash; and a job SIGKILLed while a slide is
in flight is followed by a rerun that records that slide (``Interrupted``) instead of starting it
again. Every failure comes from a real reader (tests/hostile.py): OpenSlide aborting in GLib, numpy
running out of the worker's memory, the TIFF backend's checks, a named pipe that blocks ``open``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EMBED_ARCH, one_thread_env
from conftest import make_embed_slide as make_slide
from hostile import (
    big_tile_tiff,
    deflate_bomb_tiff,
    glib_abort_tiff,
    ifd_loop_tiff,
    jpeg_sof_bomb_tiff,
    stalled_slide,
    worker_data_bytes,
)

from pipelines.embed import check_feature_file, embed_slides, read_rows
from pipelines.runtime import InFlight

EXPECTED = {
    "good0": {"done"},
    "good1": {"done"},
    "crash": {"Crashed(SIGABRT)"},  # OpenSlide: g_malloc of a declared 16384^2 tile, GLib aborts
    "big": {"MemoryLimit"},  # TIFF backend: a 768 MiB decode buffer past the worker's limit
    "loop": {"CorruptSlideError"},  # IFD chain looping back
    "deflate": {"UnreadableTileError", "DecodeLimitError"},  # 260 KB tiles inflating to 256 MiB
    "sof": {"UnreadableTileError", "DecodeLimitError"},  # JPEG tiles declaring 60000x60000 px
    "stalled": {"Timeout"},  # a named pipe: open() blocks for ever
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    import torch

    from models import backbones

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("enc")
    return backbones.save_backbone(backbones.create(EMBED_ARCH), d / "enc.safetensors")


@pytest.fixture(scope="module")
def memory_gb() -> float:
    """The embed worker's own footprint plus room for reading small slides, not for 768 MiB."""
    return (worker_data_bytes(("pipelines.embed.worker",)) + (384 << 20)) / 2**30


def _archive(d: Path) -> Path:
    d.mkdir()
    make_slide(d / "good0.svs", origin=(600, 900))
    make_slide(d / "good1.svs", origin=(1000, 1600))
    glib_abort_tiff(d / "crash.tif")
    big_tile_tiff(d / "big.tif")
    ifd_loop_tiff(d / "loop.tif")
    deflate_bomb_tiff(d / "deflate.tif")
    jpeg_sof_bomb_tiff(d / "sof.svs")
    stalled_slide(d / "stalled.svs")
    return d


@pytest.mark.timeout(900)
def test_embed_over_a_hostile_archive(tmp_path, encoder, memory_gb):
    src = _archive(tmp_path / "slides")
    out = tmp_path / "out"
    kw = dict(
        out=out,
        mpp=0.5,
        tile_size=64,
        batch_size=16,
        mpp_override=0.5,  # the crafted TIFFs carry no µm/px: they must fail for what they are
        progress=False,
        isolation={"memory_gb": memory_gb, "stall_timeout_s": 20.0, "slide_timeout_s": 120.0},
    )
    t = time.monotonic()
    summary = embed_slides(src, encoder, **kw)
    print(f"\narchive run: {time.monotonic() - t:.1f} s\n{summary.table()}")
    rows = {r.slide_id: r for r in read_rows(out / "manifest.csv")}
    print("\n".join(f"{k:8} {r.status:7} {r.error:18} {r.reason[:150]}" for k, r in sorted(rows.items())))
    assert set(rows) == set(EXPECTED)
    for sid, want in EXPECTED.items():
        r = rows[sid]
        if want == {"done"}:
            assert r.status == "done" and r.n_tiles > 0 and not r.error, r
            assert check_feature_file(out / f"{sid}.h5", {})[0]
        else:
            assert r.status == "failed" and r.error in want, r
            assert str(src / sid) in r.reason, r  # the reason names the file
            assert not (out / f"{sid}.h5").exists()
    assert "failed to allocate" in rows["crash"].reason and "isolation.memory_gb" in rows["crash"].reason
    assert "stall_timeout_s" in rows["stalled"].reason
    assert not summary.ok and summary.counts == {"done": 2, "skipped": 0, "failed": 6}
    assert not (out / ".inflight").exists()

    # a rerun neither crashes nor retries the bad files; their error classes are kept
    again = embed_slides(src, encoder, **kw)
    rows2 = {r.slide_id: r for r in read_rows(out / "manifest.csv")}
    assert again.counts == {"done": 0, "skipped": 2, "failed": 6}
    for sid, r in rows2.items():
        assert r.error == rows[sid].error and (r.status == "skipped" or r.reason.startswith("not retried"))


def _cmd(src: Path, enc: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pipelines.cli", "embed", "--slides", str(src), "--encoder", str(enc),
        "--out", str(out), "--mpp", "0.5", "--tile-size", "64", "--batch-size", "16", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.timeout(600)
def test_sigkill_while_a_slide_is_in_flight_then_rerun(tmp_path, encoder):
    """``slidestream embed`` is killed while the stalled slide is in flight (it is read last: it is
    the smallest file). The rerun records that slide as ``Interrupted`` without touching it;
    ``--retry-failed`` tries it again, and the time limit fails it as ``Timeout``."""
    src = tmp_path / "slides"
    src.mkdir()
    make_slide(src / "good.svs")
    stalled_slide(src / "stalled.svs")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cmd(src, encoder, out, "--stall-timeout", "600"),
        env=one_thread_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = InFlight(out, "embed")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300 and proc.poll() is None and "stalled" not in journal.stale():
        time.sleep(0.1)
    assert "stalled" in journal.stale(), "the job never reached the stalled slide"
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    kw = dict(out=out, mpp=0.5, tile_size=64, batch_size=16, progress=False)
    rerun = embed_slides(src, encoder, **kw, isolation={"stall_timeout_s": 5.0})  # must not raise
    rows = {r.slide_id: r for r in read_rows(out / "manifest.csv")}
    assert rerun.counts["failed"] == 1 and rows["good"].status in ("done", "skipped")
    assert check_feature_file(out / "good.h5", {})[0]
    assert rows["stalled"].status == "failed" and rows["stalled"].error == "Interrupted"
    assert "in flight" in rows["stalled"].reason and "--retry-failed" in rows["stalled"].reason
    assert rows["stalled"].seconds < 5  # recorded, not started again
    retry = embed_slides(src, encoder, **kw, retry_failed=True, isolation={"stall_timeout_s": 5.0})
    rows = {r.slide_id: r for r in read_rows(out / "manifest.csv")}
    assert retry.counts == {"done": 0, "skipped": 1, "failed": 1} and rows["stalled"].error == "Timeout"
    assert not (out / ".inflight").exists()


def test_local_names_keep_distinct_ids_through_embed(tmp_path, encoder):
    """Issue 12 §6: ``#``, ``?``, ``::`` and non-ASCII letters are file-name characters, so each
    slide gets its own id and file; two names that map to one id are both embedded."""
    import shutil

    src = tmp_path / "slides"
    src.mkdir()
    first = make_slide(src / "foo#bar.svs")
    names = ["foo?x=1.svs", "a::b.svs", "café.svs", "a b.svs", "a_b.svs"]
    for n in names:
        shutil.copy(first, src / n)
    s = embed_slides(src, encoder, out=tmp_path / "out", mpp=0.5, tile_size=64, batch_size=16, progress=False)
    assert s.ok and s.counts["done"] == 6
    rows = {r.url: r.slide_id for r in read_rows(tmp_path / "out" / "manifest.csv")}
    assert sorted(rows) == sorted(str(src / n) for n in ["foo#bar.svs", *names])
    assert len(set(rows.values())) == 6 and rows[str(src / "a_b.svs")] == "a_b"
    for sid in rows.values():
        assert check_feature_file(tmp_path / "out" / f"{sid}.h5", {})[0]
