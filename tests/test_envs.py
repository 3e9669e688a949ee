"""envs/stagewise.yaml (for --software-deployment-method conda) stays in step with pyproject.toml."""

import tomllib

import yaml

from helpers import REPO


def test_conda_environment_lists_exactly_the_package_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((REPO / "envs" / "stagewise.yaml").read_text())
    pip = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict))
    assert sorted(pip) == sorted(project["dependencies"])
    python = next(entry for entry in environment["dependencies"] if str(entry).startswith("python="))
    assert python.removeprefix("python=") >= project["requires-python"].removeprefix(">=")


def test_every_rule_uses_the_conda_environment():
    rules = "".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    assert rules.count("script:") == rules.count("conda:") > 0
