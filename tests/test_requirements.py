"""A Hugging Face Space installs requirements.txt and the gradio of the README's sdk_version, and
nothing else: both must add up to exactly what pyproject.toml says the studio needs to run."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent


def pyproject_dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {(r := Requirement(line)).name.lower(): r for line in project["dependencies"]}


def requirements_txt() -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return {(r := Requirement(line)).name.lower(): r for line in lines if line}


def space_gradio() -> Version:
    front_matter = (ROOT / "README.md").read_text().split("---")[1]
    return Version(re.search(r"^sdk_version:\s*(\S+)", front_matter, re.M).group(1))


def test_requirements_txt_is_pyprojects_runtime_dependencies_but_gradio():
    wanted = {name: str(r) for name, r in pyproject_dependencies().items() if name != "gradio"}
    assert {name: str(r) for name, r in requirements_txt().items()} == wanted


def test_the_spaces_gradio_is_one_pyproject_allows():
    assert space_gradio() in pyproject_dependencies()["gradio"].specifier
