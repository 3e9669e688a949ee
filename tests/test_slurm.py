"""A real SLURM: the tiny pipeline up to stage 0 through `snakemake --profile profiles/slurm`, with
training jobs that ask for two GPUs and train on two ranks, the first of which SLURM stops at its time
limit, resubmitted by Snakemake and resumed, and a local run of the same settings beside it.

The daemons (munged, MariaDB, slurmdbd, slurmctld, slurmd) run on this machine as root,
started by tests/cluster/slurm-up.sh (in the background when the session starts, see
conftest.py), which installs Debian's packages when they are missing, and stopped when
the session ends. The node has no GPU: slurm.conf gives it a GRES gpu:2 backed by
copies of /dev/null, and the test reads back from SLURM's accounting (sacct) that the
training jobs, and only they, asked for two GPUs, each in a job of one task; the ranks run
on the CPU (local.cpu_processes: 2), as they would on the two GPUs with device cuda.

The SLURM jobs (slurmd and all it starts) run on one CPU and the local runs on the other, and the
training is sized by a short two-rank run on one CPU while the other is busy, as it will be: the jobs
train at the measured pace, and the test takes two training jobs, as a rule, instead of a number that
varied with the load (two to five: 3 to 10 minutes) when all shared both CPUs.
"""

import contextlib
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from helpers import REPO, cluster_overrides, copy_workflow, snakemake, system_up

pytestmark = pytest.mark.slow  # a real SLURM and real Snakemake runs end to end

# slurmctld checks time limits every 30 s, so a 1-minute job is stopped 60 to 90 s after it starts,
# START_SECONDS of it start-up (Snakemake, the job's script and its two ranks on one CPU; 11 to 18 s
# measured): a job trains for 60 - START_SECONDS to 90 - START_SECONDS seconds. TRAINING_SECONDS is more
# than one job trains and less than two: the first job cannot finish and the second does.
START_SECONDS = 15
TRAINING_SECONDS = 90 - START_SECONDS + 5  # more than 75 s, less than 2 x 45 s
CALIBRATION_EPOCHS = 8


def pin(pid, cpus):
    """Run every thread of process `pid`, and all it starts from now on, on the CPUs `cpus`."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(thread), cpus)


@pytest.fixture(scope="module")
def slurm():
    """A running one-node SLURM (started in the background by conftest.py, stopped when the session ends)
    whose jobs run on the first of this process's CPUs; yields (the jobs' CPUs, the other CPUs)."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one for the SLURM jobs, one for the local run beside them")
    system_up("slurm")
    subprocess.run(["bash", str(REPO / "tests/cluster/slurm-up.sh")], check=True)  # quick when already up
    slurmd = int(Path("/run/slurmd.pid").read_text())
    jobs_cpu = {min(cpus)}
    pin(slurmd, jobs_cpu)
    yield jobs_cpu, cpus - jobs_cpu
    pin(slurmd, os.sched_getaffinity(0))


@contextlib.contextmanager
def busy(cpus):
    """A process that keeps the CPUs `cpus` busy while the block runs.

    On this project's VM the two CPUs slow each other (two ranks on one CPU train an epoch in about
    0.6 s beside an idle CPU, 1.1 to 1.3 s beside a busy one), so the pace is measured beside a busy one."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                               preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def two_rank_settings(epochs):
    """The cluster settings of `epochs` epochs on two ranks in a job that asks for two GPUs."""
    settings = cluster_overrides(epochs)
    settings["inference"] = {"simulated_events": 0}
    settings["local"].update(cpu_processes=2, training_job={**settings["local"]["training_job"], "gpus": 2})
    return settings


def local_training(workdir, epochs, cpus):
    """Start `snakemake train_stage_0` of two_rank_settings(epochs) in `workdir` on the CPUs `cpus`."""
    (workdir / "overrides.yaml").write_text(yaml.safe_dump(two_rank_settings(epochs)))
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", "train_stage_0", "--cores", "1", "--configfile",
         "config/config.yaml", "tiny.yaml", "overrides.yaml"],
        cwd=workdir, env=dict(os.environ, CONDOR_CONFIG="/dev/null"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def sacct(since, *fields, jobs_only=True):
    out = subprocess.run(["sacct", *(["-X"] if jobs_only else []), "-P", "-n", "-o", ",".join(fields), "-S", since],
                         capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines()]


def accounting(since):
    """(rule, requested TRES, state, job id) of every SLURM job since `since`."""
    return [tuple(row) for row in sacct(since, "Comment", "ReqTRES", "State", "JobID") if row[0].startswith("rule_")]


def step_tasks(since, job_ids):
    """The number of tasks of every step (but batch and extern) of the jobs `job_ids`."""
    return [int(tasks) for step, tasks in sacct(since, "JobID", "NTasks", jobs_only=False)
            if step.split(".")[0] in job_ids and step.split(".")[-1] not in ("batch", "extern") and "." in step]


def test_two_gpu_training_jobs_of_one_task_outlast_their_time_limit_and_end_as_a_local_run(slurm, tmp_path):
    # Stage 0 only, no observed set, and the data and trafo made locally: their jobs would only lengthen
    # the test (the HTCondor test submits them all); build_svd is the one CPU job.
    jobs_cpu, local_cpus = slurm
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    # The pace of two ranks on one CPU: a short local run (which also makes the local run's data) while the
    # cluster run's data and trafo are made on the jobs' CPU. Then the local run of the measured length,
    # which moves the short run's checkpoints aside, beside the cluster run.
    local = copy_workflow(tmp_path / "local")
    calibration = local_training(local, CALIBRATION_EPOCHS, local_cpus)
    cluster = copy_workflow(tmp_path / "cluster")
    snakemake(cluster, "fit_trafo", overrides=two_rank_settings(CALIBRATION_EPOCHS), cpus=jobs_cpu)
    with busy(jobs_cpu):  # until the calibration ends, as the first job's CPU will be beside the local run
        assert calibration.wait(timeout=300) == 0
    history = pd.read_csv(local / "results/tiny/stage_0/history.csv")
    seconds_per_epoch = float(history[["time_data", "time_compute", "time_validation"]].sum(axis=1).mean())

    settings = two_rank_settings(math.ceil(TRAINING_SECONDS / seconds_per_epoch))
    reference = local_training(local, settings["training"]["stage_0"]["epochs"], local_cpus)
    # Status checks sooner than in production, only to make the test faster: the plugin checks
    # this many seconds after a submission or a finished job, then 10 s later after each check
    # that found nothing finished.
    result = snakemake(cluster, "train_stage_0", "--profile", "profiles/slurm",
                       "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
                       overrides=settings, check=False, cpus=jobs_cpu)
    assert reference.wait(timeout=600) == 0
    assert result.returncode == 0, result.output[-4000:]

    jobs = accounting(since)
    rules = [rule for rule, _, _, _ in jobs]
    assert {"rule_build_svd", "rule_train_stage_0"} <= set(rules)
    stage_0_states = [state for rule, _, state, _ in jobs if rule == "rule_train_stage_0"]
    assert "TIMEOUT" in stage_0_states and stage_0_states[-1] == "COMPLETED", stage_0_states
    for rule, tres, _, _ in jobs:
        assert ("gres/gpu=2" in tres) == rule.startswith("rule_train_stage"), (rule, tres)
    training_jobs = {job_id for rule, _, _, job_id in jobs if rule.startswith("rule_train_stage")}
    tasks = step_tasks(since, training_jobs)
    assert tasks and set(tasks) == {1}, tasks  # `srun -n1`: one task that starts the two ranks
    log = (cluster / "results/tiny/logs/train_stage_0.log").read_text()
    assert "training stage_0 on 2 ranks (cpu)" in log
    assert "resuming epoch" in log or "resuming from" in log
    print(f"SLURM jobs: {len(jobs)}, stopped by their time limit: {stage_0_states.count('TIMEOUT')}, "
          f"stage 0 epochs: {settings['training']['stage_0']['epochs']} at {seconds_per_epoch:.3f} s each")

    ours = torch.load(cluster / "results/tiny/stage_0/model_stage_0.pt", weights_only=True)
    theirs = torch.load(local / "results/tiny/stage_0/model_stage_0.pt", weights_only=True)
    for name, tensor in theirs["model"].items():
        assert torch.equal(tensor, ours["model"][name]), name
