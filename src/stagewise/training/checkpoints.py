"""Checkpoint files: atomic writes, fingerprint guard, fallback to periodic checkpoints."""

import logging
import re
from pathlib import Path
from typing import Any

from ..config import Settings, stage_index
from ..files import UnsafeFile, read_earlier_torch_file, read_torch_file, write_torch_file

log = logging.getLogger(__name__)

LATEST = "model_latest.pt"
BEST = "model_best.pt"  # the validated weights of the epoch with the lowest validation loss
PERIODIC = re.compile(r"model_(\d+)\.pt")


def save(path: str | Path, state: dict[str, Any]) -> None:
    write_torch_file(path, state)


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint (or stage model) dict, or raise ValueError naming the file when it cannot be read."""
    return read_torch_file(path, "fingerprint")


def _candidates(directory: Path) -> list[Path]:
    """model_latest.pt, then periodic checkpoints newest first."""
    periodic = [(int(m.group(1)), p) for p in directory.glob("model_*.pt") if (m := PERIODIC.fullmatch(p.name))]
    return [directory / LATEST] + [p for _, p in sorted(periodic, reverse=True)]


def latest_valid(directory: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in `directory`, or None; damaged ones are skipped with a warning.

    A file that the safe loader refuses (UnsafeFile) is raised, never skipped: the stage must not
    silently start afresh beside a checkpoint of an earlier version or a planted file."""
    for path in _candidates(Path(directory)):
        if not path.exists():
            continue
        try:
            return load(path)
        except UnsafeFile:
            raise
        except ValueError as err:
            log.warning("skipping damaged checkpoint: %s", err)
    return None


def resume_state(directory: str | Path, fingerprint: str) -> dict[str, Any] | None:
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


def convert(path: str | Path, out: str | Path) -> None:
    """Rewrite checkpoint or stage model `path` of an earlier version as `out` in the safe format:
    numpy arrays become tensors, numpy scalars Python numbers. `out` may be `path`.

    Reading `path` accepts numpy arrays, dtypes and scalars besides plain data, and refuses
    anything else (UnsafeFile): no code from the file runs."""
    write_torch_file(out, read_earlier_torch_file(path, "fingerprint"))


class StageHasBegun(ValueError):
    """A stage that a checkpoint has already trained (or is training) cannot be replaced."""


def append_stage(path: str | Path, stage_settings: Settings, out: str | Path, replace: int | None = None) -> str:
    """Write a copy of checkpoint `path` to `out` whose planned stages gain `stage_settings`.

    Appends it as the next stage_<n>, or with `replace=N` replaces the planned
    stage_N, which must lie after the stage the checkpoint belongs to. Returns the
    name of the stage written."""
    state = load(path)
    planned = dict(state.get("planned_stages") or {state["stage"]: state["settings"]["training"][state["stage"]]})
    current = stage_index(state["stage"])
    if replace is None:
        name = f"stage_{max(stage_index(s) for s in planned) + 1}"
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
