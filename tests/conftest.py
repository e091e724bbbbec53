"""Shared fixtures. Real slides come from ../shared/testdata when present (tests using them skip
otherwise); generated slides are always available. Each test module may add its own fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("SLIDESTREAM_TESTDATA", REPO.parent / "shared" / "testdata"))
DEMO_SLIDE = REPO / "data" / "demo" / "CMU-1-Small-Region.svs"


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
    assert DEMO_SLIDE.exists(), "data/demo/CMU-1-Small-Region.svs is part of the repo"
    return DEMO_SLIDE
