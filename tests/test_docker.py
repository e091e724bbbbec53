"""The Docker images install from the same dependency specification as the README (pyproject.toml
via pip, no second list to drift), build on a base that has the Python they need, and every path
their documented commands name inside the image exists; the installed package carries the data
that the defaults of ``demo`` and ``bench`` read (a wheel is built and its contents listed).

The images themselves are built outside the test suite (docker/README.md says how the CPU image
was built and run on a debootstrapped Debian base where no registry but PyPI is reachable)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

DOCKERFILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda"]
#: the package data the defaults need from an installed package (wheel, image)
PACKAGE_DATA = [
    "wsi/data/CMU-1-Small-Region.svs",
    "wsi/data/LICENSE.md",
    "wsi/data/tissue-tiles.csv",
    "models/weights/tissue_unet.safetensors",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "pipelines" / "configs").rglob("*.yaml")),
]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_installs_the_project_from_pyproject(name):
    text = (REPO / name).read_text()
    assert "COPY pyproject.toml" in text
    installs = [line for line in text.splitlines() if "pip install" in line and not line.startswith("#")]
    assert installs, f"{name} installs nothing"
    for line in installs:
        # what is installed is the project itself ('.'), never a hand-written package list
        args = [
            a for a in line.split("pip install", 1)[1].split() if not a.startswith("-") and "://" not in a
        ]
        assert args == ["."], f"{name}: `{line.strip()}` installs {args}, not the project from pyproject.toml"
    assert 'ENTRYPOINT ["slidestream"]' in text
    for pkg in ("wsi", "models", "pipelines"):
        assert f"COPY {pkg} " in text


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_base_has_python_3_11(name):
    """The default base is a Python 3.11 image (the CUDA image once asked Ubuntu 24.04's apt for a
    python3.11 package it does not have); the project goes into a venv made by that Python."""
    text = (REPO / name).read_text()
    froms = [ln.split()[1] for ln in text.splitlines() if ln.startswith("FROM ")]
    assert froms == ["${BASE}"], froms
    assert re.search(r"^ARG BASE=python:3\.11(-slim)?$", text, re.M), "the default base is python:3.11"
    assert not re.search(r"apt-get install[^\n]*python3\.\d+", text), "no distro Python package by version"
    assert "python3 -m venv /opt/venv" in text and "ENV PATH=/opt/venv/bin:$PATH" in text


def _documented_image_paths() -> list[tuple[str, str]]:
    docs = ["README.md", "docker/README.md", *DOCKERFILES]
    found = []
    for doc in docs:
        for m in re.finditer(r"/opt/slidestream/([\w./-]+)", (REPO / doc).read_text()):
            found.append((doc, m.group(1).rstrip(".")))
    return found


def test_paths_the_documented_commands_use_exist_in_the_image():
    found = _documented_image_paths()
    assert found, "the docs name no file inside the image"
    copied = {
        ln.split()[1]
        for name in DOCKERFILES
        for ln in (REPO / name).read_text().splitlines()
        if ln.startswith("COPY ")
    }
    for doc, rel in found:
        assert (REPO / rel).exists(), f"{doc} names /opt/slidestream/{rel}, which is not in the repo"
        assert rel.split("/")[0] in copied, f"{doc} names /opt/slidestream/{rel}, which no image copies"
    for doc in ("README.md", "docker/README.md"):
        text = (REPO / doc).read_text()
        # a relative data path would resolve against the image's working directory (/out)
        assert "data/demo" not in text, f"{doc} still names data/demo"


def test_no_requirements_files_to_drift():
    assert not list(REPO.glob("requirements*.txt"))
    assert not list((REPO / "docker").glob("requirements*.txt"))


def test_readme_set_up_is_the_makefile_install():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Set-up\n(.*?)\n## ", readme, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.startswith("make ")]
    assert commands == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --quiet -e '.[dev]'" in makefile
    assert (
        "docker build -f docker/Dockerfile.cpu" in readme
        and "docker build -f docker/Dockerfile.cuda" in readme
    )
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_the_wheel_carries_the_data_the_defaults_read(tmp_path):
    """A non-editable install gets the demo slide, the U-Net weights and every shipped config:
    what ``slidestream demo`` and the ``bench`` defaults open from site-packages. The wheel is
    built from a copy of what the images copy (the build writes build/ and egg-info beside it)."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    for pkg in ("wsi", "models", "pipelines"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    r = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (src / "dist").glob("slidestream-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in PACKAGE_DATA if p not in names]
    assert not missing, f"the wheel lacks {missing}: add them to [tool.setuptools.package-data]"
    assert len(PACKAGE_DATA) >= 12
