"""A lock file that keeps two trainers out of one checkpoint folder."""

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

STALE_AFTER = 600.0  # s without a heartbeat before another host's lock counts as stale


class CheckpointFolderLocked(RuntimeError):
    """Another live trainer holds the lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _is_stale(path: Path, holder: Mapping[str, Any]) -> bool:
    if holder.get("host") == socket.gethostname():
        return not _alive(int(holder.get("pid", -1)))
    return time.time() - path.stat().st_mtime > STALE_AFTER


@contextmanager
def checkpoint_lock(folder: str | Path) -> Iterator[Callable[[], None]]:
    """Hold `<folder>.lock` (host, pid, start time) while the block runs.

    A lock of a dead process on this host, or one from another host without a
    heartbeat (`touch`) for STALE_AFTER seconds, is stale and taken over with a
    warning; a live one raises CheckpointFolderLocked naming its holder.
    Yields a function that refreshes the heartbeat."""
    path = Path(folder).with_name(Path(folder).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _holder(path)
            if not _is_stale(path, holder):
                raise CheckpointFolderLocked(
                    f"{folder} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
                    f"since {holder.get('since')} (lock file {path})"
                ) from None
            log.warning("removing stale lock %s of pid %s on host %s", path, holder.get("pid"), holder.get("host"))
            path.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(me, f)
    try:
        yield heartbeat(folder)
    finally:
        path.unlink(missing_ok=True)


def heartbeat(folder: str | Path) -> Callable[[], None]:
    """A function that refreshes the heartbeat of `<folder>.lock`, held by this process or its supervisor."""
    path = Path(folder).with_name(Path(folder).name + ".lock")
    return lambda: os.utime(path)
