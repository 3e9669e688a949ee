"""Interruption is a non-event: real kills and signals of a real Snakemake training job.

Each test runs `snakemake train_stage_0` on the tiny config with a longer stage
(8 epochs of 40 steps) in a temporary folder, interrupts it, reruns it, and compares
the final model with an uninterrupted run's, tensor by tensor.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import LONG_STAGE, copy_workflow, snakemake, training_process, wait_for

pytestmark = pytest.mark.slow  # real Snakemake trainings, killed and rerun

# Below the training (0.8 MB) and validation (0.4 MB) splits: both are streamed from their files.
STREAMED = {**LONG_STAGE, "local": {"memory_limit_mb": 0.3}}
MODEL = "results/tiny/stage_0/model_stage_0.pt"
CHECKPOINTS = "results/tiny/checkpoints/stage_0"
LOG = "results/tiny/logs/train_stage_0.log"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted stage: its model file's contents."""
    workdir = copy_workflow(tmp_path_factory.mktemp("uninterrupted"))
    snakemake(workdir, "train_stage_0", overrides=LONG_STAGE)
    return torch.load(workdir / MODEL, weights_only=True)


@pytest.fixture
def prepared(before_training, tmp_path):
    """A private copy of `before_training` for one test."""
    return Path(shutil.copytree(before_training, tmp_path / "workdir", symlinks=True))


def start_training(workdir):
    """Start `snakemake train_stage_0` in its own process group."""
    command = [sys.executable, "-m", "snakemake", "train_stage_0", "--cores", "2", "--rerun-incomplete",
               "--configfile", "config/config.yaml", "tiny.yaml", "overrides.yaml"]
    env = dict(os.environ, CONDOR_CONFIG="/dev/null")
    return subprocess.Popen(command, cwd=workdir, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def training_started(workdir):
    log = workdir / LOG
    return log.exists() and "epoch " in log.read_text()


def finish(workdir):
    """Unlock after a hard kill and run the stage to its end."""
    snakemake(workdir, "--unlock", overrides=LONG_STAGE)
    snakemake(workdir, "train_stage_0", "--rerun-incomplete", overrides=LONG_STAGE)


def assert_same_model(workdir, reference):
    resumed = torch.load(workdir / MODEL, weights_only=True)
    assert resumed["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert [row["epoch"] for row in resumed["history"]] == list(range(1, 9))
    history_csv = (workdir / "results/tiny/stage_0/history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history_csv[1:]] == [str(e) for e in range(1, 9)]
    for ours, theirs in zip(resumed["history"], reference["history"], strict=True):
        assert ours["train_loss"] == theirs["train_loss"] and ours["validation_loss"] == theirs["validation_loss"]


def set_last_log_aside(workdir):
    """Move the rule log of the last attempt aside (to train_stage_0.log.<n>), so that the rule log holds what
    the next attempt writes and nothing else. Snakemake removes the log when it starts the job, but until
    then the last attempt's log would read as the next one's."""
    log = workdir / LOG
    if log.exists():
        log.rename(log.with_name(f"{log.name}.{len(list(log.parent.glob(log.name + '.*')))}"))


def attempt_log(workdir):
    log = workdir / LOG
    return log.read_text(errors="replace") if log.exists() else ""


def temporary_files(workdir):
    """The temporary files in the checkpoint folder: each exists only while its checkpoint is being written."""
    return set((workdir / CHECKPOINTS).glob(".*.tmp"))


# The progress bar of an epoch, printed when the trainer begins (or resumes) it and every 5 s.
EPOCH_BAR = re.compile(r"epoch (\d+)/8:\s+\d+%")


def epochs_begun(workdir):
    """The epochs that the trainer has begun in this attempt (see set_last_log_aside)."""
    return {int(epoch) for epoch in EPOCH_BAR.findall(attempt_log(workdir))}


def kill_moment(workdir, temporary_before):
    """What the trainer was doing when the job was SIGKILLed, from what the kill left behind: a temporary file
    that this attempt created (a checkpoint write cut short: a SIGKILL lets no cleanup run), else the last
    epoch that this attempt began, unless the log says the stage is done, else nothing yet (Snakemake's or
    the trainer's start-up)."""
    left = temporary_files(workdir) - temporary_before
    if left:
        return "checkpoint write", left
    if "stage stage_0 done" in attempt_log(workdir):
        return "after the training", None
    begun = epochs_begun(workdir)
    if begun:
        return "epoch", f"epoch {max(begun)}"
    return "start-up", None


def kill_mix(moments):
    return {kind: sum(k == kind for k, _ in moments)
            for kind in ("start-up", "epoch", "checkpoint write", "after the training")}


def assert_removed_on_this_start(workdir, orphans):
    """The temporary files of a killed write are gone, and the log of this start says it removed them."""
    log = attempt_log(workdir)
    for orphan in orphans:
        assert not orphan.exists(), orphan
        assert f"removing {orphan.relative_to(workdir)}, left by a write that was killed" in log


def kill_one_attempt(workdir, orphans, rng):
    """Start the job and, once its trainer has begun an epoch (when the `orphans` of the last killed write
    must be gone), SIGKILL it: with rng None as soon as one of its checkpoint writes has a temporary file;
    else once it has begun a second epoch, after a random fraction (up to 0.9) of the first epoch's
    duration, or as the second epoch's checkpoint write begins if that comes first, so that each attempt
    adds one epoch to the stage. Returns kill_moment's (kind, what), or None when the job ended first."""
    set_last_log_aside(workdir)
    temporary_before = temporary_files(workdir)
    process = start_training(workdir)
    try:
        if not wait_for(lambda: epochs_begun(workdir), process):
            return None
        assert_removed_on_this_start(workdir, orphans)
        if rng is None:
            wait_for(lambda: temporary_files(workdir) - temporary_before, process, interval=0.0002)
        else:
            first_begun = time.monotonic()
            if not wait_for(lambda: len(epochs_begun(workdir)) >= 2, process):
                return None
            delay = rng.uniform(0.0, 0.9) * (time.monotonic() - first_begun)
            wait_for(lambda: temporary_files(workdir) - temporary_before, process, timeout=delay, interval=0.0005)
        if process.poll() is not None:
            return None
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    snakemake(workdir, "--unlock", overrides=LONG_STAGE)
    return kill_moment(workdir, temporary_before)


def test_sigkill_at_random_moments_and_during_a_checkpoint_write_changes_nothing(prepared, reference):
    """SIGKILL the whole job (Snakemake and the trainer) six times while it trains, once while a checkpoint's
    temporary file exists and then at random moments of later epochs, rerunning after each kill: the stage
    ends bit for bit where an uninterrupted one ends, and each start removes the temporary files of a
    killed write. What the trainer was doing at each kill is read from what the kill left (kill_moment)
    and printed."""
    workdir = prepared
    rng = random.Random(7)
    moments, orphans = [], set()
    for _ in range(10):
        mix = kill_mix(moments)
        if mix["epoch"] + mix["checkpoint write"] >= 6 and mix["checkpoint write"] >= 1:
            break
        moment = kill_one_attempt(workdir, orphans, rng if mix["checkpoint write"] else None)
        if moment is None:
            break  # the stage ended before enough kills: the assertion below says so
        moments.append(moment)
        orphans = moment[1] if moment[0] == "checkpoint write" else set()
    mix = kill_mix(moments)
    report = f"kill moments {mix}: " + "; ".join(
        f"{kind} ({', '.join(sorted(p.name for p in what))})" if kind == "checkpoint write" else what or kind
        for kind, what in moments)
    print(report)
    assert mix["epoch"] + mix["checkpoint write"] >= 6 and mix["checkpoint write"] >= 1, report
    assert mix["start-up"] == mix["after the training"] == 0, report
    set_last_log_aside(workdir)
    finish(workdir)
    assert_removed_on_this_start(workdir, orphans)
    assert_same_model(workdir, reference)


@pytest.mark.parametrize("stop_signal, overrides", [(signal.SIGTERM, LONG_STAGE), (signal.SIGINT, STREAMED)],
                         ids=["SIGTERM", "SIGINT-streamed"])
def test_a_stop_signal_checkpoints_mid_epoch_exits_75_and_the_rerun_resumes(prepared, reference, stop_signal,
                                                                            overrides):
    """With STREAMED, both splits exceed local.memory_limit_mb and are streamed from their files,
    while the reference held them in memory: the resumed model must still equal it bit for bit."""
    workdir = prepared
    (workdir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    process = start_training(workdir)
    assert wait_for(lambda: "epoch 2/8" in (workdir / LOG).read_text() if training_started(workdir) else False,
                    process)
    trainer = training_process(workdir)
    assert trainer is not None
    os.kill(trainer, stop_signal)
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "returned non-zero exit status 75" in output
    state = torch.load(workdir / CHECKPOINTS / "model_latest.pt", weights_only=True)
    log = (workdir / LOG).read_text()
    assert f"received {stop_signal.name}" in log
    assert log.count("exceed local.memory_limit_mb (0.3 MB): streaming") == (2 if overrides is STREAMED else 0)
    if state["partial_epoch"] is not None:  # the signal landed inside an epoch, not in its validation
        assert 0 < state["partial_epoch"]["batches"]["step"] < 40
    snakemake(workdir, "train_stage_0", overrides=overrides)
    assert "resuming from" in (workdir / LOG).read_text()
    assert_same_model(workdir, reference)


def stopped_checkpoint_matches_the_log(workdir, log):
    """The latest checkpoint is where the log says the trainer stopped: inside an epoch at a step, or after one."""
    state = torch.load(workdir / CHECKPOINTS / "model_latest.pt", weights_only=True)
    inside = re.search(r"stopping in epoch (\d+)/8 at step (\d+) of 40", log)
    if inside:
        assert state["epoch"] == int(inside.group(1)) - 1
        assert state["partial_epoch"]["batches"]["step"] == int(inside.group(2))
    else:
        after = re.search(r"stopping after epoch (\d+) of 8", log)
        assert after and state["epoch"] == int(after.group(1)) and state["partial_epoch"] is None
    return state


def test_runtime_limits_stop_a_real_job_with_exit_75_mid_run_and_the_reruns_resume(prepared, reference, monkeypatch):
    """Limits of 0.01 s, shorter than any training step: first local.runtime_limits.max_time_per_run, then,
    inside a cluster job (SLURM_JOB_ID set), local.training_job.runtime (1 min) less stop_margin (59.99 s).
    Each job stops after the first step past its limit with exit status 75, having written a checkpoint
    there; the second resumes from the first's; a rerun without a limit (local settings are in no
    fingerprint) ends where the uninterrupted run ends."""
    workdir = prepared
    monkeypatch.delenv("_CONDOR_JOB_AD", raising=False)
    steps_before, epoch_before = 0, None
    for limit in ("max_time_per_run", "stop_margin"):
        if limit == "max_time_per_run":
            monkeypatch.delenv("SLURM_JOB_ID", raising=False)
            local, seconds = {"runtime_limits": {"max_time_per_run": 0.01}}, 0.01
        else:
            monkeypatch.setenv("SLURM_JOB_ID", "1")
            local, seconds = {"training_job": {"runtime": 1, "stop_margin": 59.99}}, 1 * 60 - 59.99
        (workdir / LOG).unlink(missing_ok=True)  # the log is appended to: keep this job's lines only

        stopped = snakemake(workdir, "train_stage_0", overrides={**LONG_STAGE, "local": local}, check=False)

        assert stopped.returncode != 0
        assert re.search(r"returned non-zero exit status 75\b", stopped.output), stopped.output[-3000:]
        log = (workdir / LOG).read_text()
        assert f"max_time_per_run ({seconds} s) reached" in log
        if epoch_before is not None:
            assert f"resuming from {CHECKPOINTS} at epoch {epoch_before}" in log
        assert not (workdir / MODEL).exists()
        state = stopped_checkpoint_matches_the_log(workdir, log)
        steps = state["epoch"] * 40 + (state["partial_epoch"]["batches"]["step"] if state["partial_epoch"] else 0)
        assert steps_before < steps < 8 * 40
        steps_before, epoch_before = steps, state["epoch"]

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    snakemake(workdir, "train_stage_0", overrides=LONG_STAGE)
    assert f"resuming from {CHECKPOINTS} at epoch {epoch_before}" in (workdir / LOG).read_text()
    assert_same_model(workdir, reference)


def test_a_checkpoint_of_an_earlier_version_stops_the_rerun_until_converted_then_resumes_to_the_same_model(
        prepared, reference):
    """A stage stopped after 3 epochs leaves a checkpoint, rewritten as earlier versions wrote it (numpy's
    random state as a numpy array, which the safe loader refuses). The rerun stops with one line naming
    `stagewise convert` and leaves the checkpoint as it was (no fresh start); after the conversion the
    rerun resumes at epoch 3 and ends with the uninterrupted model."""
    workdir = prepared
    stopped = snakemake(workdir, "train_stage_0", check=False,
                        overrides={**LONG_STAGE, "local": {"runtime_limits": {"max_epochs_per_run": 3}}})
    assert stopped.returncode != 0
    latest = workdir / CHECKPOINTS / "model_latest.pt"
    state = torch.load(latest, weights_only=True)
    assert state["epoch"] == 3
    name, key, *rest = state["random_states"]["numpy"]
    state["random_states"]["numpy"] = (name, key.numpy(), *rest)
    torch.save(state, latest)  # the writer of earlier versions
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(latest)
    old = latest.read_bytes()

    refused = snakemake(workdir, "train_stage_0", overrides=LONG_STAGE, check=False)
    assert refused.returncode != 0
    assert (workdir / LOG).read_text().splitlines()[-1].endswith(
        f"{CHECKPOINTS}/model_latest.pt: written by an earlier stagewise version (it holds numpy arrays); convert "
        f"it (this runs nothing from the file): stagewise convert {CHECKPOINTS}/model_latest.pt NEW")
    assert latest.read_bytes() == old and not list(latest.parent.parent.glob("stage_0.*"))

    converted = subprocess.run([sys.executable, "-m", "stagewise.cli", "convert", latest, latest],
                               capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    snakemake(workdir, "train_stage_0", overrides=LONG_STAGE)
    assert f"resuming from {CHECKPOINTS} at epoch 3" in (workdir / LOG).read_text()
    assert_same_model(workdir, reference)


def test_early_stopping_state_survives_a_sigkill(prepared):
    """Patience 2 with an unreachable min_delta stops the stage after epoch 3. A SIGKILL right after
    epoch 2's checkpoint must not reset the count of epochs without improvement: a reset would
    make epoch 3 the best and stop only after epoch 5."""
    workdir = prepared
    stopping = {**LONG_STAGE, "training": {"stage_0": {**LONG_STAGE["training"]["stage_0"],
                                                       "early_stopping": {"patience": 2, "min_delta": 1000.0}}}}
    (workdir / "overrides.yaml").write_text(yaml.safe_dump(stopping))
    process = start_training(workdir)
    assert wait_for(lambda: training_started(workdir) and "epoch 2/8: train loss" in (workdir / LOG).read_text(),
                    process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    snakemake(workdir, "--unlock", overrides=stopping)
    snakemake(workdir, "train_stage_0", "--rerun-incomplete", overrides=stopping)
    log = (workdir / LOG).read_text()
    assert "at epoch 2" in log.split("resuming from")[1].splitlines()[0]
    assert "early stopping after epoch 3: validation_loss did not improve for 2 epochs" in log
    model = torch.load(workdir / MODEL, weights_only=True)
    assert [row["epoch"] for row in model["history"]] == [1, 2, 3]


def test_a_second_run_on_a_training_folder_refuses_at_both_locks(prepared):
    """Snakemake's own lock refuses a second snakemake; with --nolock the trainer's lock
    on the checkpoint folder refuses, naming the holder's host and pid."""
    workdir = prepared
    endless = {"training": {"stage_0": {"epochs": 1000, "batch_size": 10}}}
    (workdir / "overrides.yaml").write_text(yaml.safe_dump(endless))
    first = start_training(workdir)
    try:
        assert wait_for(lambda: training_started(workdir), first)
        second = snakemake(workdir, "train_stage_0", overrides=endless, check=False)
        assert second.returncode != 0 and "cannot be locked" in second.output
        unlocked = snakemake(workdir, "train_stage_0", "--nolock", overrides=endless, check=False)
        assert unlocked.returncode != 0
        trainer = training_process(workdir)
        assert f"is in use by pid {trainer} on host {os.uname().nodename}" in (workdir / LOG).read_text()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
