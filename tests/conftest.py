"""pytest hooks and the session fixtures of real Snakemake runs; the helpers they use are in helpers.py."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from helpers import LONG_STAGE, REPO, SYSTEM_UP, _system, cluster_overrides, copy_workflow, planned_jobs, snakemake

# The parts of tests/system-up.sh, by the fixture of the tests that need them.
SYSTEM_PARTS = {"chromium": "chromium", "slurm": "slurm"}


def pytest_collection_finish(session):
    """Start tests/system-up.sh in the background for the selected tests that need it (as root only;
    not for --collect-only).

    Besides saving the test the wait, a running SLURM controller keeps every other `snakemake`
    call fast: the SLURM plugin runs `scontrol show config` when it is imported, which waits
    about 9 s where SLURM is installed but no controller answers. So SLURM is started whenever it
    is installed (after a full run, for the quick loop too), not only for the SLURM test."""
    parts = {SYSTEM_PARTS[name] for item in session.items for name in getattr(item, "fixturenames", ())
             if name in SYSTEM_PARTS}
    if shutil.which("scontrol"):
        parts.add("slurm")
    parts = sorted(parts)
    if not parts or os.geteuid() != 0 or session.config.option.collectonly:
        return
    _system["log"] = Path(tempfile.mkstemp(prefix="stagewise-system-up.", suffix=".log")[1])
    with open(_system["log"], "w") as log:
        _system["process"] = subprocess.Popen(["bash", str(SYSTEM_UP), *parts], stdout=log, stderr=subprocess.STDOUT)
    _system["parts"] = parts


def pytest_sessionfinish(session):
    if "slurm" in _system.get("parts", ()):
        _system["process"].wait()
        subprocess.run(["bash", str(REPO / "tests/cluster/slurm-down.sh")], check=False)


@pytest.fixture(scope="session")
def before_training(tmp_path_factory):
    """A workflow copy with everything before train_stage_0 of LONG_STAGE done (the interruption and
    data-parallel tests copy it)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("before_training"))
    snakemake(workdir, "build_svd", overrides=LONG_STAGE)
    return workdir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A workflow copy where `snakemake train_stage_1` ran first, then `snakemake` (all).

    Returns (workdir, jobs of the first run, jobs of the second run)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny_run"))
    first = planned_jobs(snakemake(workdir, "train_stage_1").output)
    evaluation_after_first = (workdir / "results/tiny/evaluation").exists()
    second = planned_jobs(snakemake(workdir).output)
    return workdir, first, second, evaluation_after_first


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
    return float(history[["time_data", "time_compute", "time_validation"]].sum(axis=1).mean())
