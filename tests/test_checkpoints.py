"""Resumable training: a stage stopped and resumed, or resumed past a damaged checkpoint, ends
bit for bit where an uninterrupted run ends; checkpoints of other settings are moved aside."""

import logging
import os
import signal
import time

import pytest
import torch

from stagewise.data import EpochBatches
from stagewise.files import atomic_path
from stagewise.training import checkpoints
from stagewise.training.lock import STALE_AFTER
from stagewise.training.optim import TorchRecipe
from stagewise.training.runner import STOP_SIGNALS, StageStopped, run_stage, stop_requests
from stagewise.training.stage import time_limit

EPOCHS = 6


class TinyModel(torch.nn.Linear):
    """y = W x + b with a mean-squared-error loss."""

    def __init__(self):
        super().__init__(3, 1)

    def loss(self, x, y):
        return (self(x) - y).square().mean()


def noisy_linear_batch(index, generator, batch_size=8):
    """A batch of a noisy linear relation drawn from `generator` (the index only sets the count)."""
    x = torch.randn(batch_size, 3, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(batch_size, 1, generator=generator)
    return x, y


def batches(generator, num_batches=4):
    return EpochBatches(range(num_batches), noisy_linear_batch, generator)


def train_batches(epoch):
    return batches(torch.Generator().manual_seed(1000 + epoch))


def validation_batches():
    return batches(torch.Generator().manual_seed(1), num_batches=2)


STAGE = {"epochs": EPOCHS, "optimizer": {"type": "adam", "learning_rate": 0.05}, "scheduler": {"type": "cosine"},
         "gradient_clip": None, "ema_decay": None, "early_stopping": None}


def train(checkpoint_dir, fingerprint="settings-a", epochs=EPOCHS, max_epochs_per_run=None, checkpoint_epochs=2,
          settings=None, stage_model="last", monitor=None):
    """One process's run of the stage: model and recipe (optimizer, schedule, ...) built afresh, then run_stage.

    Returns (model, history); the stage model's weights and epoch are in `model.stage_model`."""
    torch.manual_seed(0)
    model = TinyModel()
    recipe = TorchRecipe(model, {**STAGE, "epochs": epochs, **(settings or {})})
    history, weights, weights_epoch = run_stage(
        recipe, train_batches, validation_batches, epochs, checkpoint_dir, fingerprint, {"stage": "stage_0"},
        checkpoint_epochs, max_epochs_per_run, stage_model=stage_model, monitor=monitor)
    model.stage_model = (weights, weights_epoch)
    return model, history


def without_times(history):
    return [{k: v for k, v in entry.items() if not k.startswith("time_")} for entry in history]


def assert_same_weights(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The model and history of the stage run in one go."""
    return train(tmp_path_factory.mktemp("uninterrupted") / "checkpoints")


def test_stage_stopped_every_two_epochs_and_resumed_ends_like_an_uninterrupted_run(tmp_path, uninterrupted):
    reference, reference_history = uninterrupted
    stops = 0
    for _ in range(EPOCHS):  # bounded: a run that never resumed would stop after epoch 2 forever
        try:
            model, history = train(tmp_path / "checkpoints", max_epochs_per_run=2)
            break
        except StageStopped:
            stops += 1

    assert stops == 2
    assert_same_weights(model, reference)
    assert without_times(history) == without_times(reference_history)
    assert [entry["epoch"] for entry in history] == list(range(1, EPOCHS + 1))


def test_a_checkpoint_that_calls_the_validation_loss_test_loss_resumes_like_any_other(tmp_path, uninterrupted):
    """Checkpoints written before the rename hold `test_loss` and `time_test` in their history rows and
    `test_loss` in their best epoch."""
    reference, reference_history = uninterrupted
    with pytest.raises(StageStopped):
        train(tmp_path / "checkpoints", max_epochs_per_run=3)
    latest = tmp_path / "checkpoints" / checkpoints.LATEST
    state = checkpoints.load(latest)
    rename = {"validation_loss": "test_loss", "time_validation": "time_test"}
    state["history"] = [{rename.get(k, k): v for k, v in row.items()} for row in state["history"]]
    state["best"] = {rename.get(k, k): v for k, v in state["best"].items()}
    checkpoints.save(latest, state)

    model, history = train(tmp_path / "checkpoints", stage_model="best")

    assert_same_weights(model, reference)
    assert without_times(history) == without_times(reference_history)
    losses = [row["validation_loss"] for row in history]
    assert model.stage_model[1] == losses.index(min(losses)) + 1


def test_damaged_latest_checkpoint_resumes_from_the_newest_periodic_one(tmp_path, uninterrupted, caplog):
    reference, reference_history = uninterrupted
    folder = tmp_path / "checkpoints"
    with pytest.raises(StageStopped):
        train(folder, max_epochs_per_run=3)  # stops after epoch 3; model_2.pt is the newest periodic checkpoint
    latest = folder / checkpoints.LATEST
    latest.write_bytes(latest.read_bytes()[:200])

    with caplog.at_level(logging.INFO, logger="stagewise"):
        model, history = train(folder)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipping damaged checkpoint" in w and str(latest) in w for w in warnings)
    assert any("resuming" in r.getMessage() and "epoch 2" in r.getMessage() for r in caplog.records)
    assert_same_weights(model, reference)
    assert without_times(history) == without_times(reference_history)


def test_latest_valid_skips_garbage_bytes_and_returns_the_newest_periodic_checkpoint(tmp_path):
    train(tmp_path, epochs=4)
    (tmp_path / checkpoints.LATEST).write_bytes(b"\x00garbage" * 100)

    state = checkpoints.latest_valid(tmp_path)

    assert state["epoch"] == 4
    assert (tmp_path / "model_4.pt").exists() and (tmp_path / "model_2.pt").exists()


def test_checkpoints_of_another_fingerprint_are_moved_aside_and_training_starts_afresh(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    train(folder, fingerprint="settings-a", epochs=2)
    fresh, _ = train(tmp_path / "fresh", fingerprint="settings-b", epochs=3)

    with caplog.at_level(logging.WARNING, logger="stagewise"):
        model, history = train(folder, fingerprint="settings-b", epochs=3)

    aside = tmp_path / "checkpoints.settings-a"
    assert checkpoints.load(aside / checkpoints.LATEST)["fingerprint"] == "settings-a"
    assert checkpoints.load(folder / checkpoints.LATEST)["fingerprint"] == "settings-b"
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert_same_weights(model, fresh)
    assert any(str(aside) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_load_names_the_file_of_an_unreadable_checkpoint(tmp_path):
    path = tmp_path / "model_latest.pt"
    path.write_bytes(b"not a checkpoint")

    with pytest.raises(ValueError) as error:
        checkpoints.load(path)

    assert str(path) in str(error.value)


def test_atomic_path_leaves_no_temporary_file_and_the_old_file_when_the_block_raises(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("old\n")

    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(path) as tmp:
            tmp.write_text("new\n")
            raise RuntimeError("killed")

    assert list(tmp_path.iterdir()) == [path]
    assert path.read_text() == "old\n"


def test_atomic_path_replaces_the_file_when_the_block_succeeds(tmp_path):
    path = tmp_path / "sub" / "history.csv"

    with atomic_path(path) as tmp:
        tmp.write_text("new\n")

    assert list(path.parent.iterdir()) == [path]
    assert path.read_text() == "new\n"


def test_inside_a_cluster_job_the_trainer_stops_a_margin_before_the_job_limit():
    local = {"runtime_limits": {"max_time_per_run": None}, "training_job": {"stop_margin": 300}}
    assert time_limit(local, job_runtime=None) is None  # a plain local run: no limit
    assert time_limit(local, job_runtime=60) == 3300
    assert time_limit({**local, "runtime_limits": {"max_time_per_run": 1000}}, job_runtime=60) == 1000
    assert time_limit(local, job_runtime=1) is None  # margin longer than the job: the scheduler's SIGTERM stops it


def test_no_readable_checkpoint_starts_the_stage_afresh_with_a_warning_naming_every_file(tmp_path, uninterrupted,
                                                                                      caplog):
    """README: 'it never starts over silently'. Every checkpoint of the folder is damaged: the trainer warns
    about each one, says it starts afresh, and ends where an uninterrupted run ends."""
    reference, reference_history = uninterrupted
    folder = tmp_path / "checkpoints"
    with pytest.raises(StageStopped):
        train(folder, max_epochs_per_run=5)  # model_latest.pt, model_2.pt, model_4.pt
    damaged = [folder / checkpoints.LATEST, folder / "model_4.pt", folder / "model_2.pt"]
    for path in damaged:
        path.write_bytes(path.read_bytes()[:200])

    with caplog.at_level(logging.INFO, logger="stagewise"):
        model, history = train(folder)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in damaged:
        assert any("skipping damaged checkpoint" in w and str(path) in w for w in warnings), path
    assert f"{folder} holds no readable checkpoint: starting this stage afresh" in warnings
    assert not any("resuming" in r.getMessage() for r in caplog.records)
    assert_same_weights(model, reference)
    assert without_times(history) == without_times(reference_history)


class LockWatcher:
    """A monitor (called after each epoch's checkpoint) that checks the lock file's heartbeat is fresh,
    then ages it past STALE_AFTER, so that only the next checkpoint's heartbeat can make it fresh again."""

    def __init__(self, lock):
        self.lock, self.fresh = lock, []

    def begin(self, epochs_done):
        self.age()

    def log(self, row):
        self.fresh.append(time.time() - self.lock.stat().st_mtime < STALE_AFTER)
        self.age()

    def age(self):
        aged = time.time() - STALE_AFTER - 60
        os.utime(self.lock, (aged, aged))

    def close(self):
        pass


def test_every_checkpoint_refreshes_the_lock_heartbeat(tmp_path):
    """README: the lock is 'refreshed at every checkpoint', so that another host sees a live trainer
    whose lock is never older than STALE_AFTER."""
    folder = tmp_path / "checkpoints"
    watcher = LockWatcher(folder.with_name(folder.name + ".lock"))

    train(folder, checkpoint_epochs=2, monitor=watcher)

    assert watcher.fresh == [True] * EPOCHS


@pytest.mark.parametrize("stop_signal", STOP_SIGNALS, ids=lambda s: s.name)
def test_each_stop_signal_becomes_a_request_to_stop_and_the_handler_is_restored(stop_signal):
    """SIGTERM, SIGINT and SIGUSR1 (real signals to this process) set the request the runner checks after each
    step, instead of ending the process; the interruption tests run SIGTERM and SIGINT end to end."""
    before = signal.getsignal(stop_signal)
    with stop_requests() as requests:
        assert requests["signal"] is None
        os.kill(os.getpid(), stop_signal)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert requests["signal"] == stop_signal.name
    assert signal.getsignal(stop_signal) == before
