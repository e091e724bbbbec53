"""SIGKILL ``slidestream embed`` at random points, rerun, and compare with an uninterrupted run:
the final files are complete and equal, no partial file is ever accepted as done, and the slide
that was in flight is recorded as ``Interrupted`` by the next run (``--retry-failed`` redoes it)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import EMBED_ARCH as ARCH
from conftest import make_embed_slide as make_slide
from conftest import one_thread_env

from pipelines.embed import check_feature_file, read_rows

ORIGINS = [(600, 900), (1000, 1600), (300, 2200)]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Path]:
    import torch

    from models import backbones

    d = tmp_path_factory.mktemp("kill")
    src = d / "slides"
    src.mkdir()
    for i, o in enumerate(ORIGINS):
        make_slide(src / f"s{i}.svs", origin=o)
    torch.manual_seed(0)
    enc = backbones.save_backbone(backbones.create(ARCH), d / "enc.safetensors")
    return src, enc


def _cmd(src: Path, enc: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.cli",
        "embed",
        "--slides",
        str(src),
        "--encoder",
        str(enc),
        "--out",
        str(out),
        "--mpp",
        "0.5",
        "--tile-size",
        "64",
        "--batch-size",
        "8",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process with one thread like the subprocesses (one
    subprocess start less: imports take seconds on a busy machine)."""
    import torch

    from pipelines.embed import embed_slides

    out = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert embed_slides(
            archive[0], archive[1], out=out, mpp=0.5, tile_size=64, batch_size=8, progress=False
        ).ok
    finally:
        torch.set_num_threads(threads)
    return out


def _kill_and_resume(archive, reference: Path, out: Path, seed: int) -> None:
    rng = random.Random(seed)
    proc = subprocess.Popen(
        _cmd(*archive, out), env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # wait until it writes (a temporary feature file appears), then a seeded random delay
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < 120:
        if out.exists() and any(p.name.startswith(".") and ".tmp-" in p.name for p in out.iterdir()):
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 2.5) if seed else 0.0)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = len(ORIGINS) - len(list(out.glob("*.h5")))
    # whatever sits under a final name is complete; partial work is only in temporary names
    for h5 in out.glob("*.h5"):
        ok, why, _ = check_feature_file(h5, {})
        assert ok, f"{h5.name} under its final name after SIGKILL: {why}"
    # the rerun records the slide that was in flight as failed (it may be what took the job down)
    # instead of starting it again; --retry-failed then embeds it
    again = subprocess.run(
        _cmd(*archive, out), env=one_thread_env(), capture_output=True, text=True, timeout=300
    )
    rows = read_rows(out / "manifest.csv")
    assert sorted(r.slide_id for r in rows) == [f"s{i}" for i in range(len(ORIGINS))]
    interrupted = [r for r in rows if r.status == "failed"]
    assert all(r.error == "Interrupted" and "in flight" in r.reason for r in interrupted), interrupted
    assert len(interrupted) <= 1 and again.returncode == (1 if interrupted else 0), again.stderr[-2000:]
    assert sum(r.status == "done" for r in rows) == left - len(interrupted)
    done = subprocess.run(
        [*_cmd(*archive, out), "--retry-failed"],
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out / "manifest.csv")
    assert {r.status for r in rows} <= {"done", "skipped"}
    assert sum(r.status == "done" for r in rows) == len(
        interrupted
    )  # exactly the interrupted slide was redone
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp, part or in-flight files left"
    for ref in sorted(reference.glob("*.h5")):
        with h5py.File(ref, "r") as a, h5py.File(out / ref.name, "r") as b:
            np.testing.assert_array_equal(a["features"][()], b["features"][()])
            np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
            assert b.attrs["complete"] and b.attrs["n_tiles"] == a.attrs["n_tiles"]
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(p.name for p in reference.glob("*.h5"))


def test_sigkill_mid_slide_then_resume(archive, reference, tmp_path):
    _kill_and_resume(archive, reference, tmp_path / "out", seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_sigkill_at_random_points_then_resume(archive, reference, tmp_path, seed):
    _kill_and_resume(archive, reference, tmp_path / "out", seed=seed)
