"""A real SLURM: the tiny pipeline through `snakemake --profile profiles/slurm`, with a training
job that SLURM stops at its time limit, resubmitted by Snakemake and resumed.

The daemons (munged, MariaDB, slurmdbd, slurmctld, slurmd) run on this machine as root,
started by tests/cluster/slurm-up.sh (in the background when the session starts, see
conftest.py), which installs Debian's packages when they are missing, and stopped when
the session ends. The node has no GPU: slurm.conf gives it a GRES gpu:1
backed by /dev/null, and the test reads back from SLURM's accounting (sacct ReqTRES)
that the training jobs, and only they, asked for a GPU.
"""

import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import REPO, cluster_overrides, copy_workflow, snakemake, system_up

pytestmark = pytest.mark.slow  # a real SLURM and real Snakemake runs end to end

# slurmctld checks time limits every 30 s, so a 1-minute job is stopped 60 to 90 s after it
# starts, about 10 s of it start-up. 95 s of training outlasts the first job, and what is left
# after the earliest stop (about 45 s) fits in the second: two jobs, as a rule.
TRAINING_SECONDS = 95


@pytest.fixture(scope="module")
def slurm():
    """A running one-node SLURM (started in the background by conftest.py, stopped when the session ends)."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    system_up("slurm")
    subprocess.run(["bash", str(REPO / "tests/cluster/slurm-up.sh")], check=True)  # quick when already up


def accounting(since):
    """(rule, requested TRES, state) of every SLURM job since `since`."""
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-o", "Comment,ReqTRES,State", "-S", since],
                         capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.startswith("rule_")]


def test_pipeline_on_slurm_resumes_after_time_limit_to_the_local_result(slurm, seconds_per_epoch, tmp_path):
    # No observed set: its two jobs would only lengthen the test (the HTCondor test submits them).
    settings = cluster_overrides(math.ceil(TRAINING_SECONDS / seconds_per_epoch))
    settings["inference"] = {"simulated_events": 0}
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    local = copy_workflow(tmp_path / "local")
    (local / "overrides.yaml").write_text(yaml.safe_dump(settings))
    reference = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "train_stage_1", "--cores", "1", "--configfile",
         "config/config.yaml", "tiny.yaml", "overrides.yaml"],
        cwd=local, env=dict(os.environ, CONDOR_CONFIG="/dev/null"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    cluster = copy_workflow(tmp_path / "cluster")
    # Status checks sooner than in production, only to make the test faster: the plugin checks
    # this many seconds after a submission or a finished job, then 10 s later after each check
    # that found nothing finished.
    result = snakemake(cluster, "--profile", "profiles/slurm", "--slurm-init-seconds-before-status-checks", "1",
                       "--seconds-between-status-checks", "2", overrides=settings, check=False)
    assert reference.wait(timeout=600) == 0
    assert result.returncode == 0, result.output[-4000:]

    jobs = accounting(since)
    rules = [rule for rule, _, _ in jobs]
    assert {"rule_simulate", "rule_train_stage_0", "rule_train_stage_1", "rule_evaluate"} <= set(rules)
    stage_0_states = [state for rule, _, state in jobs if rule == "rule_train_stage_0"]
    assert "TIMEOUT" in stage_0_states and stage_0_states[-1] == "COMPLETED", stage_0_states
    for rule, tres, _ in jobs:
        assert ("gres/gpu=1" in tres) == rule.startswith("rule_train_stage"), (rule, tres)
    log = (cluster / "results/tiny/logs/train_stage_0.log").read_text()
    assert "resuming epoch" in log or "resuming from" in log
    print(f"SLURM jobs: {len(jobs)}, stopped by their time limit: {stage_0_states.count('TIMEOUT')}, "
          f"stage 0 epochs: {settings['training']['stage_0']['epochs']}")

    for stage in ("stage_0", "stage_1"):
        ours = torch.load(cluster / f"results/tiny/{stage}/model_{stage}.pt", weights_only=True)
        theirs = torch.load(local / f"results/tiny/{stage}/model_{stage}.pt", weights_only=True)
        for name, tensor in theirs["model"].items():
            assert torch.equal(tensor, ours["model"][name]), (stage, name)
