"""Shared helpers: a copy of the workflow in a temporary folder and real Snakemake runs in it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def copy_workflow(target):
    """Copy the Snakefile, workflow/, config/, envs/ and the tiny config into `target`."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Snakefile", target)
    for folder in ("workflow", "config", "envs", "profiles"):
        shutil.copytree(REPO / folder, target / folder)
    shutil.copy(TINY, target / "tiny.yaml")
    return target


def snakemake(workdir, *args, overrides=None, check=True):
    """Run `snakemake --cores 2` on the tiny config (plus an optional overrides dict) in `workdir`.

    Targets must come first in `args` (multi-value options swallow what follows them)."""
    configfiles = ["config/config.yaml", "tiny.yaml"]
    if overrides is not None:
        (Path(workdir) / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        configfiles.append("overrides.yaml")
    command = [sys.executable, "-m", "snakemake", *args, "--cores", "2", "--configfile", *configfiles]
    env = dict(os.environ, CONDOR_CONFIG="/dev/null")
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    result.output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.output[-5000:]}")
    return result


def tiny_config():
    """config/config.yaml with tests/configs/tiny.yaml merged over it, as Snakemake merges configfiles."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load(TINY.read_text()))
    return config


def planned_jobs(output):
    """Rule names of the 'Job stats' table that snakemake prints (empty when nothing is to be done)."""
    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", output, re.S)
    if match is None:
        return set()
    return {line.split()[0] for line in match.group(1).splitlines() if line.strip()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A workflow copy where `snakemake train_stage_1` ran first, then `snakemake` (all).

    Returns (workdir, jobs of the first run, jobs of the second run)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny_run"))
    first = planned_jobs(snakemake(workdir, "train_stage_1").output)
    evaluation_after_first = (workdir / "results/tiny/evaluation").exists()
    second = planned_jobs(snakemake(workdir).output)
    return workdir, first, second, evaluation_after_first
