"""Checkpoint files: atomic writes, fingerprint guard, fallback to periodic checkpoints."""

import logging
import re
from pathlib import Path

import torch

from ..files import atomic_path

log = logging.getLogger(__name__)

LATEST = "model_latest.pt"
BEST = "model_best.pt"  # the validated weights of the epoch with the lowest validation loss
PERIODIC = re.compile(r"model_(\d+)\.pt")


def save(path, state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path):
    """A checkpoint dict, or raise ValueError naming the file when it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds for a damaged file
        raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise ValueError(f"{path}: not a stagewise checkpoint (no 'fingerprint')")
    return state


def _candidates(directory):
    """model_latest.pt, then periodic checkpoints newest first."""
    periodic = [(int(m.group(1)), p) for p in directory.glob("model_*.pt") if (m := PERIODIC.fullmatch(p.name))]
    return [directory / LATEST] + [p for _, p in sorted(periodic, reverse=True)]


def latest_valid(directory):
    """The newest readable checkpoint in `directory`, or None; damaged ones are skipped with a warning."""
    for path in _candidates(Path(directory)):
        if not path.exists():
            continue
        try:
            return load(path)
        except ValueError as err:
            log.warning("skipping damaged checkpoint: %s", err)
    return None


def resume_state(directory, fingerprint):
    """The checkpoint to resume from, or None to start afresh.

    A folder made by other settings (another fingerprint) is moved aside to
    `<folder>.<its fingerprint>` so that two configurations are never mixed."""
    directory = Path(directory)
    if not directory.exists():
        return None
    for orphan in directory.glob(".*.tmp"):
        log.warning("removing %s, left by a write that was killed", orphan)
        orphan.unlink()
    state = latest_valid(directory)
    if state is None:
        if any(directory.iterdir()):
            log.warning("%s holds no readable checkpoint: starting this stage afresh", directory)
        return None
    if state["fingerprint"] == fingerprint:
        log.info("resuming from %s at epoch %d", directory, state["epoch"])
        return state
    aside = directory.with_name(f"{directory.name}.{state['fingerprint']}")
    suffix = 1
    while aside.exists():
        aside = directory.with_name(f"{directory.name}.{state['fingerprint']}.{suffix}")
        suffix += 1
    directory.rename(aside)
    log.warning(
        "checkpoints in %s were made by other settings (fingerprint %s, now %s): moved to %s, starting afresh",
        directory, state["fingerprint"], fingerprint, aside,
    )
    return None


class StageHasBegun(ValueError):
    """A stage that a checkpoint has already trained (or is training) cannot be replaced."""


def append_stage(path, stage_settings, out, replace=None):
    """Write a copy of checkpoint `path` to `out` whose planned stages gain `stage_settings`.

    Appends it as the next stage_<n>, or with `replace=N` replaces the planned
    stage_N, which must lie after the stage the checkpoint belongs to. Returns the
    name of the stage written."""
    state = load(path)
    planned = dict(state.get("planned_stages") or {state["stage"]: state["settings"]["training"][state["stage"]]})
    current = int(state["stage"].split("_")[1])
    if replace is None:
        name = f"stage_{max(int(s.split('_')[1]) for s in planned) + 1}"
    else:
        name = f"stage_{replace}"
        if replace <= current:
            raise StageHasBegun(f"{path}: {name} has begun (this checkpoint is {state['stage']} at epoch "
                                f"{state['epoch']}); append a new stage instead")
        if name not in planned:
            raise ValueError(f"{path}: no planned {name} to replace (planned: {', '.join(planned)})")
    planned[name] = stage_settings
    save(out, dict(state, planned_stages=planned))
    return name
