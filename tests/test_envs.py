"""envs/stagewise.yaml (for --software-deployment-method conda) stays in step with pyproject.toml."""

import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from helpers import REPO


def conda_environment():
    return yaml.safe_load((REPO / "envs" / "stagewise.yaml").read_text())["dependencies"]


def requirement_key(text):
    """A requirement as what it means: canonical name, extras, version specifiers and marker."""
    requirement = Requirement(text)
    return (requirement.name.lower().replace("_", "-"), frozenset(requirement.extras), requirement.specifier,
            str(requirement.marker))


def test_conda_environment_lists_exactly_the_package_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip = next(entry["pip"] for entry in conda_environment() if isinstance(entry, dict))
    assert sorted(map(requirement_key, pip), key=str) == sorted(map(requirement_key, project["dependencies"]), key=str)


def test_conda_python_is_one_the_package_supports():
    """The conda spec `python=X.Y` (any X.Y.z) must lie inside pyproject's requires-python, compared as
    versions: as strings "3.9" >= "3.11" would pass."""
    requires = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    python = next(str(entry) for entry in conda_environment() if str(entry).startswith("python="))
    version = Version(python.removeprefix("python="))
    assert requires.contains(version), f"conda's python={version} is outside requires-python {requires}"
    assert requires.contains(Version(f"{version.major}.{version.minor}.99")), (version, requires)


def test_every_rule_uses_the_conda_environment():
    rules = "".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    assert rules.count("script:") == rules.count("conda:") > 0
