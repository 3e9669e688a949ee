"""HTCondor up to the schedd: the tiny pipeline through `--profile profiles/condor` with the real
snakemake-executor-plugin-htcondor and the real htcondor2 bindings (Submit, JobEventLog).

No condor daemon can run here (PyPI's htcondor wheel holds only the bindings), so a live
pool is NOT exercised: tests/cluster/local_schedd.py replaces the schedd alone with a test
double that records each submit description, runs the job on this machine and writes the
job event log that the plugin parses. The first training job is held after 15 s, as
HTCondor holds a job past its allowed_job_duration (SIGTERM, then a 012 event); the plugin
fails it after --htcondor-held-timeout, Snakemake resubmits it, and it resumes.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, cluster_overrides, copy_workflow

pytestmark = pytest.mark.slow  # the HTCondor profile and real Snakemake runs end to end

HOLD_AFTER = 15
# Twice the hold time of training: stage 0 is held once on any machine.
TRAINING_SECONDS = 2 * HOLD_AFTER
CONFIGS = ["--configfile", "config/config.yaml", "tiny.yaml", "overrides.yaml"]


def prepared(workdir, settings):
    workdir = copy_workflow(workdir)
    (workdir / "overrides.yaml").write_text(yaml.safe_dump(settings))
    return workdir


def test_pipeline_through_the_condor_profile_submits_what_it_should_and_resumes_a_held_job(seconds_per_epoch,
                                                                                           tmp_path):
    settings = cluster_overrides(math.ceil(TRAINING_SECONDS / seconds_per_epoch))
    # Two GPUs asked for, one process training (cpu_processes 1): the SLURM test trains on two ranks.
    settings["local"]["training_job"]["gpus"] = 2
    env = dict(os.environ, CONDOR_CONFIG="/dev/null")
    local = prepared(tmp_path / "local", settings)
    reference = subprocess.Popen([sys.executable, "-m", "snakemake", "train_stage_1", "--cores", "1", *CONFIGS],
                                 cwd=local, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster = prepared(tmp_path / "cluster", settings)
    result = subprocess.run(
        [sys.executable, str(REPO / "tests/cluster/local_schedd.py"), "submits.jsonl", "--profile", "profiles/condor",
         "--htcondor-held-timeout", "1", "--seconds-between-status-checks", "1", *CONFIGS],
        cwd=cluster, env=dict(env, LOCAL_SCHEDD_HOLD_AFTER=str(HOLD_AFTER)), capture_output=True, text=True)
    assert reference.wait(timeout=600) == 0
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    submits = [json.loads(line) for line in (cluster / "submits.jsonl").read_text().splitlines()]
    by_rule = {}
    for submit in submits:
        by_rule.setdefault(Path(submit["output"]).parent.name, []).append(submit)
    assert len(by_rule["train_stage_0"]) == 2  # held once, then resubmitted
    log_files = {submit["log"] for submit in submits}
    assert log_files == {".snakemake/htcondor/snakemake-rules.log"}
    cpu_rule, training_rule = by_rule["fit_trafo"][0], by_rule["train_stage_0"][0]
    assert "request_gpus" not in cpu_rule and cpu_rule["request_cpus"] == "1"
    assert cpu_rule["request_memory"] == "4000MB" and cpu_rule["getenv"] == "True"
    assert training_rule["request_gpus"] == "2" and training_rule["request_cpus"] == "1"
    assert training_rule["request_memory"] == "2000MB" and training_rule["getenv"] == "True"
    assert training_rule["allowed_job_duration"] == "60"
    for submit in (cpu_rule, training_rule):
        rule = Path(submit["output"]).parent.name
        assert submit["output"].startswith(f".snakemake/htcondor/{rule}/") and submit["output"].endswith(".out")
        assert submit["error"].startswith(f".snakemake/htcondor/{rule}/") and submit["error"].endswith(".err")
    infer_rule = by_rule["infer_set"][0]  # posteriors of the observed set: a CPU job here (local.device cpu)
    assert "request_gpus" not in infer_rule and (cluster / "results/tiny/inference/simulated/posterior.h5").exists()
    assert "Hold reason: The job exceeded allowed job duration" in result.stdout + result.stderr
    assert "resuming from" in (cluster / "results/tiny/logs/train_stage_0.log").read_text()

    for stage in ("stage_0", "stage_1"):
        ours = torch.load(cluster / f"results/tiny/{stage}/model_{stage}.pt", weights_only=True)
        theirs = torch.load(local / f"results/tiny/{stage}/model_{stage}.pt", weights_only=True)
        for name, tensor in theirs["model"].items():
            assert torch.equal(tensor, ours["model"][name]), (stage, name)
