"""The notebooks in ``notebooks/``: stored without outputs (fast), and each one executes from top to
bottom in a real Jupyter kernel running this interpreter (slow; nbclient).

The kernel is the ``python3`` kernelspec written to a temporary ``JUPYTER_PATH`` with this
interpreter's absolute path, so a user-level ``python3`` kernelspec cannot shadow the venv; an
extra first cell (in the in-memory copy only) checks ``sys.executable``. Matplotlib in the
kernel uses the inline backend, as in Jupyter. Per-notebook times are printed by pytest's
``--durations``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 420  # one cell; the slowest (a short training run) takes well under this
WARNING = re.compile(r"\b\w*Warning: .*")
#: printed by huggingface_hub (imported by timm) in any kernel without ipywidgets; not ours to fix
ALLOWED_WARNINGS = ("TqdmWarning: IProgress not found",)
#: what each notebook must print when it worked (beyond "no cell raised")
EXPECTED_OUTPUT = {
    "01_explore_slide": ("backend: zarr", "identical pixels: True"),
    "02_pretrain_and_probe": ("20 steps in", "backbone.safetensors", "random init"),
    "03_mil_heatmaps": ("pooled out-of-fold AUROC", "heatmap.json"),
    "04_segmentation": ("Dice epithelium", ".labels.ome.zarr"),
    "05_compare_encoders": ("| task | encoder | probe |", "vit_tiny_patch16_224"),
}


def test_notebooks_present() -> None:
    names = {p.stem for p in NOTEBOOKS}
    for want in (
        "01_explore_slide",
        "02_pretrain_and_probe",
        "03_mil_heatmaps",
        "04_segmentation",
        "05_compare_encoders",
    ):
        assert want in names, f"notebooks/{want}.ipynb is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_without_outputs(path: Path) -> None:
    """What pre-commit's nbstripout leaves: no outputs, no execution counts, valid nbformat 4."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name} cell {i} has stored outputs; run nbstripout"
        assert cell.execution_count is None, f"{path.name} cell {i} has an execution count; run nbstripout"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", (
        f"{path.name}: kernelspec should be python3"
    )
    assert any(c.cell_type == "markdown" for c in nb.cells), f"{path.name} has no explanation cells"
    src = "\n".join(c.source for c in nb.cells)
    assert "shared/testdata" not in src and "../shared" not in src, f"{path.name} must use the demo data only"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec that runs this interpreter, first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (slidestream tests)",
                "language": "python",
            }
        )
    )
    monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    # figures render inline as in Jupyter (the kernel is a separate process; Agg would warn on show())
    monkeypatch_module.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch_module.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return "python3"


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(
    path: Path, kernel_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs every cell (cwd = notebooks/, as when opened in Jupyter); fails on any cell error.
    The kernel's TMPDIR is this test's tmp_path, so the notebook's outputs land there."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    check = nbformat.v4.new_code_cell("import sys\nprint(sys.executable)")
    nb.cells.insert(0, check)
    client = NotebookClient(
        nb,
        kernel_name=kernel_env,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised:\n{e}")
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: executed in {elapsed:.1f} s")

    executable = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream").strip()
    assert Path(executable).resolve() == Path(sys.executable).resolve(), (
        f"the kernel ran {executable}, not this interpreter {sys.executable}"
    )
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name} cell {i}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
        stderr = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")
        warned = [w for w in WARNING.findall(stderr) if not any(ok in w for ok in ALLOWED_WARNINGS)]
        assert not warned, f"{path.name} cell {i} warned:\n{stderr}"
    text = "".join(
        o.get("text", "") + "".join(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    for want in EXPECTED_OUTPUT.get(path.stem, ()):
        assert want in text, f"{path.name}: expected {want!r} in the outputs"
    written = [p for p in tmp_path.glob("slidestream-*") if any(p.iterdir())]
    assert written, f"{path.name} wrote nothing to its temporary output directory"
    n_figures = sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    )
    assert n_figures >= 1, f"{path.name} drew no inline figure"
