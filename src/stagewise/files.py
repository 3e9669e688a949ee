"""Atomic file writes: every output is written to a temporary file and renamed.

A write that fails because the device (or the disk quota) is full raises NoSpaceLeft, whose
message is one line naming the file: `no space left on device writing <path>`."""

import errno
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

log = logging.getLogger(__name__)

FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
FULL_MARGIN = 1 << 20  # bytes: after a failed write, a filesystem with less than this free counts as full


class NoSpaceLeft(OSError):
    """A write failed because the device or the disk quota is full. str(): one line naming the file."""

    def __str__(self):
        return self.strerror


@contextmanager
def full_device_errors(path):
    """Raise NoSpaceLeft naming `path` for an error in the block that a full device caused: errno ENOSPC
    or EDQUOT (also as the error's cause or context), or an OSError or RuntimeError without errno (torch's
    'iostream error', some of h5py's) while the filesystem of `path` has (almost) no space left.
    Other errors pass unchanged."""
    try:
        yield
    except NoSpaceLeft:
        raise
    except Exception as err:
        code = _full_errno(err, path)
        if code is None:
            raise
        raise NoSpaceLeft(code, f"{FULL[code]} writing {path}", str(path)) from err


def _full_errno(err, path):
    """ENOSPC or EDQUOT when a full device caused `err`, else None."""
    cause, seen = err, set()
    while cause is not None and id(cause) not in seen:
        if getattr(cause, "errno", None) in FULL:
            return cause.errno
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, (OSError, RuntimeError)) and getattr(err, "errno", None) is None:
        try:
            fs = os.statvfs(path if os.path.isdir(path) else os.path.dirname(path) or ".")
        except OSError:
            return None
        if fs.f_bavail * fs.f_frsize < FULL_MARGIN:
            log.info("%s: %s: %s with %d bytes free: taken as a full device", path, type(err).__name__, err,
                     fs.f_bavail * fs.f_frsize)
            return errno.ENOSPC
    return None


@contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside `path` (ending in `suffix`, for writers that insist on one);
    rename it onto `path` if the block succeeds. The temporary file is always removed; a full device
    raises NoSpaceLeft naming `path`."""
    path = Path(path)
    with full_device_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        with full_device_errors(path):  # checked before the temporary file is removed and frees its space
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_yaml(path, data):
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_torch_file(path, state):
    """torch.save of `state` (a dict), atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_torch_file(path, required_key):
    """The dict in a torch file (a checkpoint or stage model), or ValueError naming the file when
    it cannot be read or lacks `required_key`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds for a damaged file
        raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or required_key not in state:
        raise ValueError(f"{path}: not a stagewise checkpoint (no '{required_key}')")
    return state
