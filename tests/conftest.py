"""Shared fixtures and builders. Real slides come from ../shared/testdata when present (tests using
them skip otherwise); generated slides are always available. The tests mirror the packages
(``tests/wsi``, ``tests/models``, ``tests/pipelines/<job>``); what several test modules need lives
here (no test module imports another): the demo slide and its pixels decoded once per session,
the torchrun helper, tolerances, and the builders of embedding slides and MIL feature archives."""

from __future__ import annotations

import csv
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("SLIDESTREAM_TESTDATA", REPO.parent / "shared" / "testdata"))
DEMO_SLIDE = REPO / "wsi" / "data" / "CMU-1-Small-Region.svs"  # package data (wsi.data)


def testdata(rel: str) -> Path:
    """Path of a file in ../shared/testdata, or skip the test when it is not there."""
    p = TESTDATA / rel
    if not p.exists():
        pytest.skip(f"test data {rel} not present ({TESTDATA})")
    return p


testdata.__test__ = False  # a helper, not a test: modules import it by name


def one_thread_env() -> dict[str, str]:
    """Environment for subprocesses: one torch/OpenMP thread each (2-core machines), the repo and
    the tests folder importable."""
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC ARGS...`` (the real torch.distributed.run,
    gloo on CPU) from the repo root, one thread per process, output captured."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=REPO, env=one_thread_env(), capture_output=True, text=True, timeout=timeout
    )


torchrun.__test__ = False


def assert_close_scaled(actual, expected, *, rtol: float, floor: float = 1e-7, msg: str = "") -> None:
    """``max|actual - expected| <= rtol * max|expected| + floor`` over a whole tensor or array.

    Floating-point sums done in another order (another CPU, thread count or BLAS kernel) differ by a
    few units in the last place of the *largest* terms summed, so the bound scales with the tensor's
    magnitude rather than element by element: an element near zero of a large gradient can carry
    round-off from its large neighbours. ``floor`` only covers all-zero or tiny tensors. Callers
    pick ``rtol`` far below the size of the bugs they guard against (a factor 2 from a wrong
    micro-batch scale or a missing all-reduce is a relative error of 0.5)."""
    import numpy as np

    a = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, dtype=np.float64)
    b = np.asarray(expected.detach().cpu() if hasattr(expected, "detach") else expected, dtype=np.float64)
    assert a.shape == b.shape, f"{msg}: shapes {a.shape} != {b.shape}"
    if a.size == 0:
        return
    diff = float(np.abs(a - b).max())
    bound = rtol * float(np.abs(b).max()) + floor
    assert diff <= bound, (
        f"{msg}: max |diff| {diff:.3g} > {bound:.3g} (rtol {rtol} x max|expected| + {floor})"
    )


assert_close_scaled.__test__ = False


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread, as the subprocesses it is compared with."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_slide() -> Path:
    """The CC0 CMU-1-Small-Region slide shipped in the repo (always present)."""
    assert DEMO_SLIDE.exists(), "wsi/data/CMU-1-Small-Region.svs is part of the repo"
    return DEMO_SLIDE


@functools.lru_cache(maxsize=1)
def demo_level0() -> np.ndarray:
    """Level 0 of the demo slide (RGB uint8, read-only), decoded once per test process."""
    from wsi.synth import load_demo_pixels

    px = load_demo_pixels(DEMO_SLIDE)
    px.flags.writeable = False
    return px


@pytest.fixture(scope="session")
def demo_pixels() -> np.ndarray:
    """Level 0 of the demo slide, decoded once per session (read-only: copy before writing)."""
    return demo_level0()


# --- builders ----------------------------------------------------------------------------------
#: the timm encoder of the embedding tests (small and fast on CPU)
EMBED_ARCH = "resnet10t"


def make_embed_slide(
    path: Path,
    *,
    origin=(600, 900),
    size=(512, 384),
    mpp: float | None = 0.5,
    corrupt_tiles: tuple[int, ...] = (),
) -> Path:
    """A 2-level tiled JPEG TIFF of real demo pixels; with ``mpp`` an Aperio description carries
    it (so OpenSlide and the TIFF backend both see it). ``corrupt_tiles``: level-0 tile indices
    whose JPEG stream is overwritten (reading them fails)."""
    import tifffile

    x, y = origin
    img = np.ascontiguousarray(demo_level0()[y : y + size[1], x : x + size[0]])
    h, w = img.shape[:2]
    desc = (
        (
            f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (128x128) JPEG/RGB Q=90|AppMag = 20|"
            f"MPP = {mpp}"
        )
        if mpp
        else "slidestream test slide"
    )
    with tifffile.TiffWriter(path) as t:
        t.write(img, tile=(128, 128), compression="jpeg", photometric="rgb", description=desc, subfiletype=0)
        t.write(
            np.ascontiguousarray(img[::2, ::2]),
            tile=(128, 128),
            compression="jpeg",
            photometric="rgb",
            subfiletype=1,
        )
    if corrupt_tiles:
        with tifffile.TiffFile(path) as tf:
            offsets = tf.pages[0].dataoffsets
            counts = tf.pages[0].databytecounts
        with open(path, "r+b") as f:
            for i in corrupt_tiles:
                f.seek(offsets[i])
                f.write(b"\x00" * min(64, counts[i]))
    return path


#: feature width of the synthetic MIL archives
MIL_DIM = 16


def write_feature_slide(
    path: Path, positive: bool, rng: np.random.Generator, n: int | None = None, grade: int = 0
) -> None:
    """A feature file of ``n`` tiles: in positives a fifth of the tiles are targets, carrying ±4 with
    random signs on four dimensions (:func:`pipelines.tasks.signed_features`: the bag mean does not
    move, so mean pooling cannot find them); ``grade`` shifts a second, slide-wide feature (for a
    multi-task column)."""
    from pipelines.tasks import signed_features
    from wsi.io import FeatureWriter

    n = n or int(rng.integers(20, 40))
    targets = np.zeros(n, bool)
    if positive:
        targets[: max(2, n // 5)] = True
    f = signed_features(targets, MIL_DIM, rng)
    f[:, 8] += grade * 1.5
    coords = np.stack([np.arange(n) % 8 * 256, np.arange(n) // 8 * 256], 1)
    with FeatureWriter(
        path,
        MIL_DIM,
        {"mpp": 0.5, "tile_size_px": 256, "tile_size_level0": 256, "slide_url": f"/nowhere/{path.stem}.svs"},
    ) as w:
        w.append(f, coords)


def make_mil_archive(tmp: Path, n_patients: int = 18, seed: int = 0) -> tuple[Path, Path]:
    """``(features dir, labels.csv)``: two slides per patient, alternating tumour/normal patients,
    a random grade per slide."""
    rng = np.random.default_rng(seed)
    feats = tmp / "features"
    rows = []
    for p in range(n_patients):
        pos = p % 2 == 0
        for s in range(2):  # two slides per patient, same label
            sid = f"P{p:02d}-S{s}"
            grade = int(rng.integers(0, 2))
            write_feature_slide(feats / f"{sid}.h5", pos, rng, grade=grade)
            rows.append(
                {
                    "slide_id": sid,
                    "patient_id": f"P{p:02d}",
                    "label": "tumor" if pos else "normal",
                    "grade": f"g{grade}",
                }
            )
    labels = tmp / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return feats, labels


#: the arguments of a short cross-validated MIL run
MIL_TRAIN_ARGS = ("--folds", "3", "--epochs", "12", "--no-progress", "bootstrap=50")


def mil_train(feats: Path, labels: Path, out: Path, *extra: str) -> int:
    """``slidestream mil train`` on an archive with :data:`MIL_TRAIN_ARGS`; returns the exit code."""
    from pipelines.cli import main

    return main(
        [
            "mil",
            "train",
            "--features",
            str(feats),
            "--labels",
            str(labels),
            "--out",
            str(out),
            *MIL_TRAIN_ARGS,
            *extra,
        ]
    )


make_embed_slide.__test__ = False
write_feature_slide.__test__ = False
