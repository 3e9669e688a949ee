"""Data-parallel training on the CPU: real ranks (processes) with gloo's real collectives, no GPU.

Unit level: ranks started by torch.multiprocessing train a small float64 flow on batches drawn from
an epoch generator, against the same steps in one process. Workflow level: `snakemake train_stage_0`
on the tiny config with local.cpu_processes: 2 (the job supervises two ranks; 4 epochs of 40 steps),
run twice, stopped by SIGTERM mid-epoch, with one rank SIGKILLed, and resumed on two ranks and on one.
"""

import copy
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from helpers import LONG_STAGE, snakemake, tiny_config, training_process, wait_for
from stagewise import config as settings
from stagewise.data import EpochBatches
from stagewise.models.posterior import PosteriorModel
from stagewise.training.optim import TorchRecipe
from stagewise.training.parallel import init_ranks
from stagewise.training.ranks import Ranks
from test_checkpoints import without_times
from test_interruption import CHECKPOINTS, LOG, MODEL, start_training

ARCHITECTURE = dict(num_detectors=2, num_inputs=2 * 6, svd_size=4, num_asd_features=2, num_parameters=2,
                    embedding={"hidden_dims": [16, 16], "output_dim": 8},
                    flow={"num_transforms": 2, "hidden_dim": 16, "num_blocks": 1, "num_bins": 4, "tail_bound": 4.0})
# A short step (7 rows: 4 + 3), and a last one of 1 row that leaves rank 1 an empty share.
STEP_ROWS = [8, 7, 8, 8, 1]


def stage_settings():
    stage = copy.deepcopy(tiny_config()["training"]["stage_0"])
    stage.update(ema_decay=0.9, gradient_clip={"type": "norm", "max": 1.0})
    settings.fill_stage_defaults(stage)
    return stage


def make_batch(index, generator):
    """Labels, strain and ASD features of len(index) events, in float64, from `generator`."""
    rows = len(index)
    return (torch.randn(rows, 2, generator=generator, dtype=torch.float64),
            torch.randn(rows, 2, 2, 6, generator=generator, dtype=torch.float64),
            torch.randn(rows, 2, generator=generator, dtype=torch.float64))


def steps():
    """One epoch's batches, drawn from its generator as the trainer draws them."""
    return EpochBatches([torch.arange(rows) for rows in STEP_ROWS], make_batch, torch.Generator().manual_seed(5))


def train(ranks):
    """(shards of every step, weights, validation loss) of this rank after training on steps()."""
    torch.manual_seed(0)
    model = PosteriorModel(ARCHITECTURE).double()
    model.embedding.freeze_svd(True)
    recipe = TorchRecipe(model, stage_settings(), ranks)
    shards, losses = [], []
    for batch in steps():
        shards.append(ranks.shard(batch))
        losses.append(recipe.train_step(batch)[0])
    return {"shards": shards, "losses": losses, "weights": model.state_dict(),
            "validation": recipe.validation_loss(steps())}


def rank_process(rank, size, folder):
    ranks = init_ranks(rank, size, folder / "rendezvous", {"device": "cpu"})
    torch.set_num_threads(1)
    torch.save(train(ranks), folder / f"rank_{rank}.pt")
    dist.destroy_process_group()


def run_ranks(size, folder):
    mp.spawn(rank_process, args=(size, folder), nprocs=size)
    return [torch.load(folder / f"rank_{rank}.pt", weights_only=True) for rank in range(size)]


@pytest.fixture(scope="module")
def one_process():
    torch.set_num_threads(1)
    return train(Ranks())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two ranks held after the steps."""
    return run_ranks(2, tmp_path_factory.mktemp("two_ranks"))


def test_the_shares_of_the_ranks_together_are_the_whole_batch_of_each_step(ranks):
    for step, batch in enumerate(steps()):
        for part, whole in zip(zip(*(r["shards"][step] for r in ranks), strict=True), batch, strict=True):
            assert torch.equal(torch.cat(part), whole), step
    assert [len(r["shards"][1][0]) for r in ranks] == [4, 3]
    assert [len(r["shards"][4][0]) for r in ranks] == [1, 0]


def test_two_ranks_train_as_one_process_within_1e10_in_float64_and_hold_identical_weights(ranks, one_process):
    for name, expected in one_process["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        assert torch.allclose(ranks[0]["weights"][name], expected, rtol=0, atol=1e-10), name
    changed = [n for n, w in one_process["weights"].items() if not torch.equal(w, train_initial_weights()[n])]
    assert len(changed) > 10  # the steps moved the weights: the comparison is not of untrained weights
    for ours, theirs in zip(ranks[0]["losses"], one_process["losses"], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-12)
    assert ranks[0]["validation"] == ranks[1]["validation"] == pytest.approx(one_process["validation"], rel=1e-12)


def train_initial_weights():
    torch.manual_seed(0)
    return PosteriorModel(ARCHITECTURE).double().state_dict()


def test_one_rank_through_the_data_parallel_path_trains_bit_for_bit_as_one_process(tmp_path, one_process):
    (rank,) = run_ranks(1, tmp_path)
    for name, expected in one_process["weights"].items():
        assert torch.equal(rank["weights"][name], expected), name
    assert rank["losses"] == one_process["losses"] and rank["validation"] == one_process["validation"]


# ---- the training job: two ranks under `snakemake train_stage_0` ----

EPOCHS = 4
TWO_RANKS = {**LONG_STAGE, "training": {"stage_0": {"epochs": EPOCHS, "batch_size": 10}},
             "local": {"cpu_processes": 2}}
ONE_RANK = {**TWO_RANKS, "local": {"cpu_processes": 1}}


def copy_of(workdir, target):
    return Path(shutil.copytree(workdir, target, symlinks=True))


@pytest.fixture(scope="module")
def two_ranks(before_training, tmp_path_factory):
    """The stage trained uninterrupted on two ranks: its model file's contents and its log."""
    workdir = copy_of(before_training, tmp_path_factory.mktemp("two_ranks") / "workdir")
    snakemake(workdir, "train_stage_0", overrides=TWO_RANKS)
    return torch.load(workdir / MODEL, weights_only=True), (workdir / LOG).read_text()


def assert_same_model(workdir, reference):
    ours = torch.load(workdir / MODEL, weights_only=True)
    assert ours["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, ours["model"][name]), name
    assert [row["validation_loss"] for row in ours["history"]] == \
        [row["validation_loss"] for row in reference["history"]]


def rank_processes(supervisor):
    """{rank: pid} of the ranks that the training job `supervisor` started."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor and "stagewise.training.parallel" in cmdline:
            pids[int(cmdline.rstrip("\0").split("\0")[-1])] = int(proc.name)
    return pids


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_two_rank_job_after_a_settings_change_moves_the_old_checkpoints_aside_and_equals_a_fresh_run(
        before_training, two_ranks, tmp_path):
    """Every rank looks for a checkpoint to resume from; only rank 0 may move another configuration's aside
    (both once raced to rename the folder, and the job failed)."""
    reference, log = two_ranks
    assert "training stage_0 on 2 ranks (cpu), 1 threads each" in log
    assert f"rank 0 stagewise.training.runner: epoch {EPOCHS}/{EPOCHS}" in log
    workdir = copy_of(before_training, tmp_path / "workdir")
    one_epoch = copy.deepcopy(TWO_RANKS)
    one_epoch["training"]["stage_0"]["epochs"] = 1
    snakemake(workdir, "train_stage_0", overrides=one_epoch)
    snakemake(workdir, "train_stage_0", overrides=TWO_RANKS)
    assert_same_model(workdir, reference)
    aside = [folder.name for folder in (workdir / CHECKPOINTS).parent.glob("stage_0.*")]
    assert len(aside) == 1 and "were made by other settings" in (workdir / LOG).read_text(), aside


def start_two_ranks(before_training, target):
    """A copy of `before_training` whose two-rank job has begun epoch 2: (workdir, snakemake process,
    the job's pid, {rank: pid})."""
    workdir = copy_of(before_training, target)
    (workdir / "overrides.yaml").write_text(yaml.safe_dump(TWO_RANKS))
    process = start_training(workdir)
    assert wait_for(lambda: f"epoch 2/{EPOCHS}" in (workdir / LOG).read_text() if (workdir / LOG).exists() else False,
                    process)
    supervisor = training_process(workdir)
    assert supervisor is not None
    ranks = rank_processes(supervisor)
    assert sorted(ranks) == [0, 1]
    return workdir, process, supervisor, ranks


@pytest.mark.slow
def test_sigterm_mid_epoch_stops_both_ranks_at_one_step_with_exit_75_and_resumes_on_two_or_one(
        before_training, two_ranks, tmp_path):
    reference, _ = two_ranks
    workdir, process, supervisor, ranks = start_two_ranks(before_training, tmp_path / "workdir")
    os.kill(supervisor, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert "returned non-zero exit status 75" in output
    assert not any(alive(pid) for pid in ranks.values())
    log = (workdir / LOG).read_text()
    stop = re.search(rf"rank 0 \S+: stopping in epoch (\d+)/{EPOCHS} at step (\d+) of 40: received SIGTERM", log)
    assert stop, log[-2000:]
    state = torch.load(workdir / CHECKPOINTS / "model_latest.pt", weights_only=True)
    assert state["ranks"] == 2
    assert (state["epoch"] + 1, state["partial_epoch"]["batches"]["step"]) == (int(stop[1]), int(stop[2]))
    one_rank = copy_of(workdir, tmp_path / "one_rank")

    snakemake(workdir, "train_stage_0", overrides=TWO_RANKS)
    assert "resuming from" in (workdir / LOG).read_text()
    assert_same_model(workdir, reference)

    snakemake(one_rank, "train_stage_0", overrides=ONE_RANK)
    log = (one_rank / LOG).read_text()
    assert "resuming a checkpoint written by 2 ranks on 1: the rest of the stage trains as 1 rank would" in log
    resumed = torch.load(one_rank / MODEL, weights_only=True)
    assert [row["epoch"] for row in resumed["history"]] == list(range(1, EPOCHS + 1))
    done = int(stop[1]) - 1  # the epochs before the stop, kept in the checkpoint
    assert without_times(resumed["history"][:done]) == without_times(reference["history"][:done])


@pytest.mark.slow
def test_sigkill_of_one_rank_fails_the_job_ends_the_other_and_the_rerun_resumes_bit_for_bit(
        before_training, two_ranks, tmp_path):
    reference, _ = two_ranks
    workdir, process, _, ranks = start_two_ranks(before_training, tmp_path / "workdir")
    time.sleep(0.5)
    os.kill(ranks[1], signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "returned non-zero exit status 1" in output
    assert not any(alive(pid) for pid in ranks.values())
    log = (workdir / LOG).read_text()
    assert re.search(r"rank 1 failed \(exit status -9\): the other ranks were ended", log), log[-2000:]
    state = torch.load(workdir / CHECKPOINTS / "model_latest.pt", weights_only=True)
    assert state["epoch"] >= 1
    snakemake(workdir, "train_stage_0", "--rerun-incomplete", overrides=TWO_RANKS)
    assert "resuming from" in (workdir / LOG).read_text()
    assert_same_model(workdir, reference)
