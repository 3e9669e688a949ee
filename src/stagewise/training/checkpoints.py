"""Checkpoint files: atomic writes, fingerprint guard, fallback to periodic checkpoints."""

import logging
import re
from pathlib import Path

import torch

from ..files import atomic_path

log = logging.getLogger(__name__)

LATEST = "model_latest.pt"
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
