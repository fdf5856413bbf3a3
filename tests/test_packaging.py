"""What pyproject.toml promises a fresh machine: the Python versions it accepts can install everything it
asks for."""

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def lowest_python(specifier: SpecifierSet) -> Version:
    """The oldest Python release (3.x.0) that ``specifier`` accepts."""
    return next(version for minor in range(6, 40) if (version := Version(f"3.{minor}.0")) in specifier)


def test_the_oldest_python_fxcache_accepts_is_one_every_dependency_accepts():
    """``requires-python`` was ">=3.10" while diffusers 0.42 needs 3.11: on Python 3.10 pip refused with
    "No matching distribution found for diffusers>=0.42" (session 29), an error that names diffusers and
    not the Python version. Each installed dependency's own ``Requires-Python`` must accept fxcache's
    oldest Python."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    oldest = lowest_python(SpecifierSet(project["requires-python"]))
    requirements = [Requirement(line) for line in project["dependencies"]]
    core = {requirement.name for requirement in requirements}
    requirements += [Requirement(line) for group in project["optional-dependencies"].values() for line in group]
    refused, checked = [], set()
    for requirement in requirements:
        try:
            metadata = importlib.metadata.metadata(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            assert requirement.name not in core, f"{requirement.name}, a dependency of fxcache, is not installed"
            continue  # an extra not installed here
        checked.add(requirement.name)
        if oldest not in SpecifierSet(metadata.get("Requires-Python") or ""):
            refused.append(f"{requirement.name} {metadata['Version']} (Requires-Python {metadata['Requires-Python']})")
    assert core <= checked
    assert not refused, f"pyproject.toml accepts Python {oldest}, which these refuse: {refused}; raise requires-python"
