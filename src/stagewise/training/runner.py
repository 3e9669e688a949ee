"""Run the epochs of one training stage with checkpoints, resume, signals and runtime limits.

The runner knows nothing of the physics: it gets a recipe (the model and what updates
it: optimizer, learning rate, clipping, EMA, early stopping; see Recipe) and two
functions that return batches. `train_batches(epoch)` returns an EpochBatches whose
data order and random draws depend only on the epoch number, so resuming from a
checkpoint, at an epoch boundary or in the middle of an epoch, reproduces the
uninterrupted run bit for bit.

A stop request (SIGTERM, SIGINT or SIGUSR1, as schedulers send before a kill) or a
runtime limit makes the runner write a checkpoint at the next step boundary and raise
StageStopped, whose exit code EXIT_STOPPED (75) tells "checkpointed, run me again".
"""

import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from .. import layouts
from ..data import EpochBatches
from . import checkpoints
from .lock import checkpoint_lock, heartbeat
from .optim import EarlyStopping
from .ranks import ONE_PROCESS, Ranks

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: checkpoint written, run the job again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Recipe(Protocol):
    """A model and everything that updates its weights in one stage (optim.TorchRecipe,
    keras_recipe.KerasRecipe): what the runner trains, validates and checkpoints."""

    model: Any
    early_stopping: EarlyStopping | None

    def train_step(self, batch: Any) -> tuple[float, float]:
        """One optimizer step: (loss, gradient norm before clipping); FloatingPointError on a non-finite loss."""

    def validation_loss(self, batches: Iterable[Any]) -> float: ...

    def end_epoch(self, validation_loss: float) -> None:
        """Step the learning-rate schedule."""

    def current_learning_rate(self) -> float: ...

    def weights(self) -> Any:
        """The validated weights, as the stage model file stores them."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _renamed(row):
    """A history row (or best-epoch record) with the validation loss and time under their current
    names: files written before they were renamed call them test_loss and time_test."""
    if row is None:
        return row
    return {layouts.LEGACY_HISTORY_NAMES.get(key, key): value for key, value in row.items()}


class StageStopped(Exception):
    """The stage stopped early (signal or runtime limit); the latest checkpoint holds its state."""

    exit_code = EXIT_STOPPED


@contextmanager
def stop_requests():
    """While active, STOP_SIGNALS set `requests["signal"]` instead of killing the process."""
    requests = {"signal": None}

    def request_stop(signum, frame):
        requests["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def random_states():
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states):
    torch.set_rng_state(states["torch"])
    name, key, *rest = states["numpy"]  # the key is stored as a tensor (files.plain)
    np.random.set_state((name, np.asarray(key), *rest))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class _Run:
    """The state of one stage in one process: what a checkpoint saves and restores."""

    def __init__(self, recipe, checkpoint_dir, fingerprint, metadata, heartbeat, ranks):
        self.recipe, self.ranks = recipe, ranks
        self.checkpoint_dir, self.fingerprint, self.metadata = checkpoint_dir, fingerprint, metadata
        self.heartbeat = heartbeat
        self.history, self.epoch, self.partial = [], 0, None
        self.best = None  # {"epoch", "validation_loss"} of the best validation so far
        self.stopped_early = False

    def restore(self, state):
        if state.get("ranks", 1) != self.ranks.size:
            log.warning("resuming a checkpoint written by %d ranks on %d: the rest of the stage trains as %d rank%s "
                        "would, so it does not end bit for bit where the uninterrupted run would",
                        state.get("ranks", 1), self.ranks.size, self.ranks.size, "s" if self.ranks.size > 1 else "")
        self.recipe.load_state_dict(state)
        set_random_states(state["random_states"])
        self.history, self.epoch, self.partial = [_renamed(r) for r in state["history"]], state["epoch"], \
            state["partial_epoch"]
        self.best, self.stopped_early = _renamed(state["best"]), state["stopped_early"]

    def save(self, periodic=False):
        if not self.ranks.main:
            return
        state = dict(
            self.metadata, fingerprint=self.fingerprint, epoch=self.epoch, partial_epoch=self.partial,
            ranks=self.ranks.size,
            history=self.history, best=self.best, stopped_early=self.stopped_early, random_states=random_states(),
            **self.recipe.state_dict(),
        )
        checkpoints.save(self.checkpoint_dir / checkpoints.LATEST, state)
        if periodic:
            checkpoints.save(self.checkpoint_dir / f"model_{self.epoch}.pt", state)
        self.heartbeat()

    def save_best(self, validation_loss):
        """Write model_best.pt (the validated weights) when `validation_loss` is the lowest so far."""
        if self.best is not None and not validation_loss < self.best["validation_loss"]:
            return
        self.best = {"epoch": self.epoch, "validation_loss": validation_loss}
        if not self.ranks.main:
            return
        checkpoints.save(self.checkpoint_dir / checkpoints.BEST, dict(
            self.metadata, fingerprint=self.fingerprint, epoch=self.epoch, validation_loss=validation_loss,
            history=self.history, model=self.recipe.weights()))

    def stage_model(self, which):
        """(weights, epoch) of the stage model: the last epoch's validated weights, or model_best.pt's."""
        if which == "last":
            return self.recipe.weights(), self.epoch
        if self.best is None:
            raise FloatingPointError("stage_model: best, but no epoch had a finite validation loss")
        state = checkpoints.load(self.checkpoint_dir / checkpoints.BEST)
        if state["fingerprint"] != self.fingerprint or state["epoch"] != self.best["epoch"]:
            raise ValueError(f"{self.checkpoint_dir / checkpoints.BEST}: holds epoch {state['epoch']} of fingerprint "
                             f"{state['fingerprint']}, expected epoch {self.best['epoch']} of {self.fingerprint}")
        return state["model"], state["epoch"]


def _resume_state(checkpoint_dir: Path, fingerprint: str, ranks: Ranks) -> dict[str, Any] | None:
    """checkpoints.resume_state on every rank, rank 0 first: it may move another configuration's folder
    aside or remove a killed write's leftovers, which the other ranks must not race it to."""
    state = checkpoints.resume_state(checkpoint_dir, fingerprint) if ranks.main else None
    ranks.sum([0.0])  # the other ranks wait here for rank 0
    return state if ranks.main else checkpoints.resume_state(checkpoint_dir, fingerprint)


def run_stage(recipe: Recipe, train_batches: Callable[[int], EpochBatches],
              validation_batches: Callable[[], EpochBatches], epochs: int, checkpoint_dir: str | Path,
              fingerprint: str, metadata: dict[str, Any], checkpoint_epochs: int = 10,
              max_epochs_per_run: int | None = None, max_time_per_run: float | None = None,
              stage_model: str = "last", monitor: Any = None,
              ranks: Ranks = ONE_PROCESS) -> tuple[list[dict[str, Any]], Any, int]:
    """Train until `epochs` (or early stopping) and return (history, stage model weights, their epoch).

    history: a list of dicts, one per epoch. stage_model: "last" or "best" (lowest validation loss).
    monitor: None or an object with begin(epoch), log(row) and close(), e.g. monitor.Monitor.
    ranks: this process's rank of a data-parallel stage (parallel.py), whose supervisor holds the lock;
    the ranks stop together, and only rank 0 writes files and returns the weights (None elsewhere).
    Resumes from `checkpoint_dir` when it holds a checkpoint with this fingerprint.
    Raises StageStopped after checkpointing on a stop signal or a runtime limit:
    max_time_per_run (s) is checked at every step, max_epochs_per_run after every epoch."""
    checkpoint_dir = Path(checkpoint_dir)
    lock = nullcontext(heartbeat(checkpoint_dir)) if ranks.supervised else checkpoint_lock(checkpoint_dir)
    with lock as beat, stop_requests() as requests:
        run = _Run(recipe, checkpoint_dir, fingerprint, metadata, beat, ranks)
        state = _resume_state(checkpoint_dir, fingerprint, ranks)
        if state is not None:
            run.restore(state)
        start, epochs_this_run = time.monotonic(), 0
        if monitor is not None:
            monitor.begin(run.epoch)

        def stop_reason():
            """Why to stop now, or None: the same on every rank."""
            time_up = bool(max_time_per_run and time.monotonic() - start >= max_time_per_run)
            signalled, timed_out = ranks.sum([bool(requests["signal"]), time_up])
            if signalled:
                return f"received {requests['signal'] or 'a stop signal on another rank'}"
            if timed_out:
                return f"max_time_per_run ({max_time_per_run} s) reached"
            return None

        try:
            while run.epoch < epochs and not run.stopped_early:
                _train_epoch(run, train_batches(run.epoch + 1), epochs, stop_reason)
                _end_epoch(run, validation_batches(), epochs, checkpoint_epochs, monitor)
                epochs_this_run += 1
                reason = stop_reason()
                if max_epochs_per_run and epochs_this_run >= max_epochs_per_run:
                    reason = f"max_epochs_per_run ({max_epochs_per_run}) reached"
                if reason and run.epoch < epochs and not run.stopped_early:
                    log.warning("stopping after epoch %d of %d: %s; run again to resume", run.epoch, epochs, reason)
                    raise StageStopped(f"{reason} after epoch {run.epoch}")
        except StageStopped:
            ranks.check_identical(recipe.model)
            raise
        finally:
            if monitor is not None:
                monitor.close()
        ranks.check_identical(recipe.model)
        weights, weights_epoch = run.stage_model(stage_model) if ranks.main else (None, run.epoch)
    if not run.history or not math.isfinite(run.history[-1]["validation_loss"]):
        raise FloatingPointError("training ended without a finite validation loss")
    return run.history, weights, weights_epoch


def _end_epoch(run, validation_batches, epochs, checkpoint_epochs, monitor):
    """Validate, record the epoch, step the schedule and early stopping, write the checkpoints."""
    t0 = time.monotonic()
    validation_loss = run.recipe.validation_loss(validation_batches)
    run.epoch += 1
    partial = run.partial
    row = dict(
        epoch=run.epoch, train_loss=partial["loss_sum"] / partial["count"], validation_loss=validation_loss,
        learning_rate=run.recipe.current_learning_rate(), grad_norm=partial["grad_norm_sum"] / partial["steps"],
        time_data=partial["time_data"], time_compute=partial["time_compute"], time_validation=time.monotonic() - t0,
    )
    run.history.append(row)
    run.recipe.end_epoch(validation_loss)
    if run.recipe.early_stopping is not None and run.recipe.early_stopping.update(row):
        run.stopped_early = True
        log.info("early stopping after epoch %d: %s did not improve for %d epochs", run.epoch,
                 run.recipe.early_stopping.settings["metric"], run.recipe.early_stopping.settings["patience"])
    run.partial = None
    if math.isfinite(validation_loss):
        run.save_best(validation_loss)
    run.save(periodic=run.epoch % checkpoint_epochs == 0)
    if monitor is not None:
        monitor.log(row)
    log.info("epoch %d/%d: train loss %.4f, validation loss %.4f, lr %.2e, data %.1f s, compute %.1f s", run.epoch,
             epochs, row["train_loss"], validation_loss, row["learning_rate"], row["time_data"], row["time_compute"])


def _train_epoch(run, batches, epochs, stop_reason):
    """Train epoch run.epoch + 1 from run.partial (its progress so far) to its end."""
    if run.partial is None:
        run.partial = {"loss_sum": 0.0, "count": 0, "steps": 0, "grad_norm_sum": 0.0, "time_data": 0.0,
                       "time_compute": 0.0, "batches": None}
    else:
        batches.resume(run.partial["batches"])
        log.info("resuming epoch %d at step %d", run.epoch + 1, run.partial["batches"]["step"])
    description = f"epoch {run.epoch + 1}/{epochs}"
    progress = tqdm(total=len(batches), initial=batches.step, desc=description, mininterval=5, leave=False,
                    disable=not run.ranks.main)
    partial = run.partial
    batch_iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(batch_iterator, None)
        if batch is None:
            break
        t1 = time.perf_counter()
        try:
            loss, grad_norm = run.recipe.train_step(batch)
        except FloatingPointError as err:
            raise FloatingPointError(f"{description}: {err} at step {batches.step}") from None
        partial["grad_norm_sum"] += grad_norm
        partial["loss_sum"] += loss * len(batch[0])
        partial["count"] += len(batch[0])
        partial["steps"] += 1
        partial["time_data"] += t1 - t0
        partial["time_compute"] += time.perf_counter() - t1
        progress.update()
        reason = stop_reason()
        if reason and batches.step < len(batches):
            partial["batches"] = batches.position()
            run.save()
            log.warning("stopping in %s at step %d of %d: %s; checkpoint written, run again to resume",
                        description, batches.step, len(batches), reason)
            raise StageStopped(f"{reason} in {description}")
    progress.close()
