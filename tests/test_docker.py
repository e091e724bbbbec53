"""Docker cannot build on this machine; check instead that the images install from the same
dependency specification as the README (pyproject.toml via pip), with no second list to drift."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

DOCKERFILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_installs_the_project_from_pyproject(name):
    text = (REPO / name).read_text()
    assert "COPY pyproject.toml" in text
    installs = [line for line in text.splitlines() if "pip install" in line]
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
