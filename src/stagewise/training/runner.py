"""Run the epochs of one training stage with checkpoints, resume, signals and runtime limits.

The runner knows nothing of the physics: it gets a model with `loss(*batch)`, an
optimizer, a scheduler and two functions that return batches. `train_batches(epoch)`
returns an EpochBatches whose data order and random draws depend only on the epoch
number, so resuming from a checkpoint, at an epoch boundary or in the middle of an
epoch, reproduces the uninterrupted run bit for bit.

A stop request (SIGTERM, SIGINT or SIGUSR1, as schedulers send before a kill) or a
runtime limit makes the runner write a checkpoint at the next step boundary and raise
StageStopped, whose exit code EXIT_STOPPED (75) tells "checkpointed, run me again".
"""

import logging
import math
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoints
from .lock import checkpoint_lock

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: checkpoint written, run the job again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@torch.no_grad()
def _validate(model, batches):
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += model.loss(*batch).item() * len(batch[0])
        count += len(batch[0])
    return total / count


class _Run:
    """The state of one stage in one process: what a checkpoint saves and restores."""

    def __init__(self, model, optimizer, scheduler, checkpoint_dir, fingerprint, metadata, heartbeat):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.checkpoint_dir, self.fingerprint, self.metadata = checkpoint_dir, fingerprint, metadata
        self.heartbeat = heartbeat
        self.history, self.epoch, self.partial = [], 0, None

    def restore(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_random_states(state["random_states"])
        self.history, self.epoch, self.partial = state["history"], state["epoch"], state["partial_epoch"]

    def save(self, periodic=False):
        state = dict(
            self.metadata, fingerprint=self.fingerprint, epoch=self.epoch, partial_epoch=self.partial,
            history=self.history, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), random_states=random_states(),
        )
        checkpoints.save(self.checkpoint_dir / checkpoints.LATEST, state)
        if periodic:
            checkpoints.save(self.checkpoint_dir / f"model_{self.epoch}.pt", state)
        self.heartbeat()


def run_stage(model, optimizer, scheduler, train_batches, validation_batches, epochs, checkpoint_dir,
              fingerprint, metadata, checkpoint_epochs=10, max_epochs_per_run=None, max_time_per_run=None):
    """Train until `epochs` and return the history (a list of dicts, one per epoch).

    Resumes from `checkpoint_dir` when it holds a checkpoint with this fingerprint.
    Raises StageStopped after checkpointing on a stop signal or a runtime limit:
    max_time_per_run (s) is checked at every step, max_epochs_per_run after every epoch."""
    checkpoint_dir = Path(checkpoint_dir)
    with checkpoint_lock(checkpoint_dir) as heartbeat, stop_requests() as requests:
        run = _Run(model, optimizer, scheduler, checkpoint_dir, fingerprint, metadata, heartbeat)
        state = checkpoints.resume_state(checkpoint_dir, fingerprint)
        if state is not None:
            run.restore(state)
        start, epochs_this_run = time.monotonic(), 0

        def stop_reason():
            if requests["signal"]:
                return f"received {requests['signal']}"
            if max_time_per_run and time.monotonic() - start >= max_time_per_run:
                return f"max_time_per_run ({max_time_per_run} s) reached"
            return None

        while run.epoch < epochs:
            _train_epoch(run, train_batches(run.epoch + 1), epochs, stop_reason)
            t0 = time.monotonic()
            test_loss = _validate(model, validation_batches())
            run.epoch += 1
            run.history.append(dict(
                epoch=run.epoch, train_loss=run.partial["loss_sum"] / run.partial["count"], test_loss=test_loss,
                learning_rate=optimizer.param_groups[0]["lr"], time_train=run.partial["time_train"],
                time_test=time.monotonic() - t0,
            ))
            scheduler.step()
            run.partial = None
            run.save(periodic=run.epoch % checkpoint_epochs == 0)
            log.info("epoch %d/%d: train loss %.4f, test loss %.4f, lr %.2e, %.1f s", run.epoch, epochs,
                     run.history[-1]["train_loss"], test_loss, run.history[-1]["learning_rate"],
                     run.history[-1]["time_train"])
            epochs_this_run += 1
            reason = stop_reason()
            if max_epochs_per_run and epochs_this_run >= max_epochs_per_run:
                reason = f"max_epochs_per_run ({max_epochs_per_run}) reached"
            if reason and run.epoch < epochs:
                log.warning("stopping after epoch %d of %d: %s; run again to resume", run.epoch, epochs, reason)
                raise StageStopped(f"{reason} after epoch {run.epoch}")
    if not run.history or not math.isfinite(run.history[-1]["test_loss"]):
        raise FloatingPointError("training ended without a finite validation loss")
    return run.history


def _train_epoch(run, batches, epochs, stop_reason):
    """Train epoch run.epoch + 1 from run.partial (its progress so far) to its end."""
    if run.partial is None:
        run.partial = {"loss_sum": 0.0, "count": 0, "time_train": 0.0, "batches": None}
    else:
        batches.resume(run.partial["batches"])
        log.info("resuming epoch %d at step %d", run.epoch + 1, run.partial["batches"]["step"])
    run.model.train()
    description = f"epoch {run.epoch + 1}/{epochs}"
    progress = tqdm(total=len(batches), initial=batches.step, desc=description, mininterval=5, leave=False)
    t0 = time.monotonic()
    for batch in batches:
        run.optimizer.zero_grad(set_to_none=True)
        loss = run.model.loss(*batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{description}: loss is {loss.item()} at step {batches.step}")
        loss.backward()
        run.optimizer.step()
        run.partial["loss_sum"] += loss.item() * len(batch[0])
        run.partial["count"] += len(batch[0])
        progress.update()
        reason = stop_reason()
        if reason and batches.step < len(batches):
            run.partial["time_train"] += time.monotonic() - t0
            run.partial["batches"] = batches.position()
            run.save()
            log.warning("stopping in %s at step %d of %d: %s; checkpoint written, run again to resume",
                        description, batches.step, len(batches), reason)
            raise StageStopped(f"{reason} in {description}")
    progress.close()
    run.partial["time_train"] += time.monotonic() - t0
