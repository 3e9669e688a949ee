"""Run the epochs of one training stage with checkpoints, resume and runtime limits.

The runner knows nothing of the physics: it gets a model with `loss(*batch)`, an
optimizer, a scheduler and two functions that yield batches. Each epoch's batches
must depend only on the epoch number (draw them from a generator seeded by it), so
that resuming from the checkpoint of epoch e reproduces epochs e+1, ... bit for bit.
"""

import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoints

log = logging.getLogger(__name__)

EXIT_RESUBMIT = 75  # runtime limit reached: checkpoint written, run the job again to continue


class RuntimeLimitReached(Exception):
    """The stage stopped early (runtime limit); the latest checkpoint holds its state."""

    exit_code = EXIT_RESUBMIT


def _train_epoch(model, optimizer, batches, description):
    model.train()
    total, count = 0.0, 0
    for batch in tqdm(batches, desc=description, mininterval=5, leave=False):
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(*batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{description}: loss is {loss.item()} at step {count}")
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch[0])
        count += len(batch[0])
    return total / count


@torch.no_grad()
def _validate(model, batches):
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += model.loss(*batch).item() * len(batch[0])
        count += len(batch[0])
    return total / count


def run_stage(model, optimizer, scheduler, train_batches, validation_batches, epochs, checkpoint_dir,
              fingerprint, metadata, checkpoint_epochs=10, max_epochs_per_run=None, max_time_per_run=None):
    """Train until `epochs` and return the history (a list of dicts, one per epoch).

    train_batches(epoch) and validation_batches() return iterables of batches.
    Resumes from `checkpoint_dir` when it holds a checkpoint with this fingerprint.
    Raises RuntimeLimitReached after checkpointing when a runtime limit is hit."""
    checkpoint_dir = Path(checkpoint_dir)
    state = checkpoints.resume_state(checkpoint_dir, fingerprint)
    history, epoch = [], 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, epoch = state["history"], state["epoch"]
    start, epochs_this_run = time.monotonic(), 0
    while epoch < epochs:
        epoch += 1
        t0 = time.monotonic()
        train_loss = _train_epoch(model, optimizer, train_batches(epoch), f"epoch {epoch}/{epochs}")
        t1 = time.monotonic()
        test_loss = _validate(model, validation_batches())
        learning_rate = optimizer.param_groups[0]["lr"]
        scheduler.step()
        history.append(dict(epoch=epoch, train_loss=train_loss, test_loss=test_loss, learning_rate=learning_rate,
                            time_train=t1 - t0, time_test=time.monotonic() - t1))
        log.info("epoch %d/%d: train loss %.4f, test loss %.4f, lr %.2e, %.1f s",
                 epoch, epochs, train_loss, test_loss, learning_rate, t1 - t0)
        state = dict(metadata, fingerprint=fingerprint, epoch=epoch, history=history, model=model.state_dict(),
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
        checkpoints.save(checkpoint_dir / checkpoints.LATEST, state)
        if epoch % checkpoint_epochs == 0:
            checkpoints.save(checkpoint_dir / f"model_{epoch}.pt", state)
        epochs_this_run += 1
        elapsed = time.monotonic() - start
        per_epoch = elapsed / epochs_this_run
        if epoch < epochs and (
            (max_epochs_per_run and epochs_this_run >= max_epochs_per_run)
            or (max_time_per_run and elapsed + per_epoch > max_time_per_run)
        ):
            log.warning("runtime limit reached after epoch %d (%d epochs, %.0f s in this run): "
                        "run again to resume", epoch, epochs_this_run, elapsed)
            raise RuntimeLimitReached(f"stopped after epoch {epoch} of {epochs}")
    if not history or not math.isfinite(history[-1]["test_loss"]):
        raise FloatingPointError("training ended without a finite validation loss")
    return history
