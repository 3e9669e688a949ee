"""Shared helpers: a copy of the workflow in a temporary folder and real Snakemake runs in it."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from snakemake.utils import update_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"
SYSTEM_UP = REPO / "tests" / "system-up.sh"
# The parts of tests/system-up.sh each test file needs.
SYSTEM_PARTS = {"test_evaluation.py": "chromium", "test_slurm.py": "slurm"}
_system = {}


def pytest_collection_finish(session):
    """Start tests/system-up.sh in the background for the selected tests that need it (as root only).

    Besides saving the test the wait, a running SLURM controller keeps every other `snakemake`
    call fast: the SLURM plugin runs `scontrol show config` when it is imported, which waits
    about 9 s where SLURM is installed but no controller answers."""
    parts = sorted({SYSTEM_PARTS[item.path.name] for item in session.items if item.path.name in SYSTEM_PARTS})
    if not parts or os.geteuid() != 0:
        return
    _system["log"] = Path(tempfile.mkstemp(prefix="stagewise-system-up.", suffix=".log")[1])
    with open(_system["log"], "w") as log:
        _system["process"] = subprocess.Popen(["bash", str(SYSTEM_UP), *parts], stdout=log, stderr=subprocess.STDOUT)
    _system["parts"] = parts


def pytest_sessionfinish(session):
    if "slurm" in _system.get("parts", ()):
        _system["process"].wait()
        subprocess.run(["bash", str(REPO / "tests/cluster/slurm-down.sh")], check=False)


def system_up(part):
    """Wait for the background start of `part`, or run it now; raise with the log if it failed."""
    process = _system.get("process")
    if process is None or part not in _system["parts"]:
        subprocess.run(["bash", str(SYSTEM_UP), part], check=True)
    elif process.wait() != 0:
        raise RuntimeError(f"tests/system-up.sh failed:\n{_system['log'].read_text()[-3000:]}")


def copy_workflow(target):
    """Copy the Snakefile, workflow/, config/, envs/, profiles/, examples/ and the tiny config into `target`."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Snakefile", target)
    for folder in ("workflow", "config", "envs", "profiles", "examples"):
        shutil.copytree(REPO / folder, target / folder)
    shutil.copy(TINY, target / "tiny.yaml")
    return target


def snakemake(workdir, *args, overrides=None, check=True, configfiles=("config/config.yaml", "tiny.yaml")):
    """Run `snakemake --cores 2` on the tiny config (or `configfiles`), plus an optional overrides
    dict, in `workdir`.

    Targets must come first in `args` (multi-value options swallow what follows them)."""
    configfiles = list(configfiles)
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


def cluster_overrides(epochs):
    """The cluster tests' settings: one thread, a 1-minute 2 GB training job, and stage 0 with
    `epochs` epochs of batch size 10."""
    return {"local": {"threads": 1, "training_job": {"mem_mb": 2000, "runtime": 1}},
            "training": {"stage_0": {"epochs": epochs, "batch_size": 10}}}


@pytest.fixture(scope="session")
def seconds_per_epoch(tmp_path_factory):
    """Seconds per epoch of the cluster tests' stage 0 on this machine: a short local training's mean
    data, compute and validation time per epoch (its history.csv).

    The cluster tests need a training that outlasts its job's time limit: they size it from this,
    so that it does so on a fast machine as on a slow one."""
    workdir = copy_workflow(tmp_path_factory.mktemp("calibration"))
    snakemake(workdir, "train_stage_0", overrides=cluster_overrides(12))
    history = pd.read_csv(workdir / "results/tiny/stage_0/history.csv")
    assert len(history) == 12
    return float(history[["time_data", "time_compute", "time_test"]].sum(axis=1).mean())
