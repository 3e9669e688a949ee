"""Atomic file writes: every output is written to a temporary file and renamed.

A write that fails because the device (or the disk quota) is full raises NoSpaceLeft, whose
message is one line naming the file: `no space left on device writing <path>`."""

import errno
import json
import logging
import os
import pickle
import pickletools
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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


class UnsafeFile(ValueError):
    """A torch file that the safe loader refuses: it would build an object that is not plain data."""


class OldFormat(UnsafeFile):
    """A torch file written by stagewise before safe loading, which holds numpy objects; `stagewise convert`
    rewrites it."""


def plain(obj):
    """`obj` as what torch's weights_only loader accepts: numpy arrays become tensors, numpy scalars
    Python numbers; dicts, lists and tuples are converted item by item."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    return obj


def write_torch_file(path, state):
    """torch.save of `state` (a dict) as plain data (see `plain`), atomically.

    Raises TypeError, leaving `path` untouched, when `state` holds an object that the safe loader
    would refuse."""
    with atomic_path(path) as tmp:
        torch.save(plain(state), tmp)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:
            raise TypeError(f"{path}: not written: it would hold {', '.join(unsafe)}, which the safe loader refuses")


def _pickle_globals(path):
    """The module.name of every object a bare pickle file would build, found by reading its opcodes
    (pickletools runs nothing)."""
    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # damaged or not a pickle: name what was found so far
        pass
    return list(dict.fromkeys(names))


# The numpy objects in files of earlier versions (random states, Keras weights): arrays, their dtypes
# and numpy scalars, under numpy 2's module names and numpy 1's.
_DTYPES = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]
_MULTIARRAY = [(f, f"{module}.multiarray.{f.__name__}") for module in ("numpy.core", "numpy._core")
               for f in (np._core.multiarray._reconstruct, np._core.multiarray.scalar)]  # type: ignore[attr-defined]
EARLIER_NUMPY = [np.ndarray, np.dtype, *_DTYPES, *_MULTIARRAY]
EARLIER_NAMES = {"numpy.ndarray", "numpy.dtype", *(f"numpy.dtypes.{t.__name__}" for t in _DTYPES),
                 *(name for _, name in _MULTIARRAY)}


def _refusal(path, err):
    """The error for a file that torch's weights_only loader refused with `err`: UnsafeFile naming the
    objects it would have built, or ValueError when it names none (a damaged file)."""
    try:
        objects = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not torch's zip format: a bare pickle
        objects = _pickle_globals(path) or re.findall(r"GLOBAL (\S+)", str(err))
    if objects and set(objects) <= EARLIER_NAMES:
        return OldFormat(f"{path}: written by an earlier stagewise version (it holds numpy arrays); convert it "
                         f"(this runs nothing from the file): stagewise convert {path} NEW")
    if not objects:  # nothing named: damaged rather than unsafe
        return ValueError(f"{path}: unreadable checkpoint (UnpicklingError: damaged, or not a torch file)")
    return UnsafeFile(f"{path}: refused: loading it would build {', '.join(objects)}; a stagewise file holds only "
                      "tensors, numbers, strings, lists and dicts, and nothing from this one was run")


def read_torch_file(path, required_key):
    """The dict in a torch file (a checkpoint or stage model), read with torch's weights_only loader,
    which builds only tensors, numbers, strings, lists, tuples and dicts and never runs code from the
    file. Raises UnsafeFile (OldFormat for a file of an earlier version) when the file holds anything
    else, ValueError naming the file when it cannot be read or lacks `required_key`."""
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of a bare pickle before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except Exception as err:  # torch raises many kinds for a damaged file
        raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    return _checked(path, state, required_key)


def read_earlier_torch_file(path, required_key):
    """Like read_torch_file, but also accepting the numpy arrays, dtypes and scalars that files of
    earlier versions hold (allow-listed by torch's safe-globals mechanism, nothing else): what
    `stagewise convert` reads."""
    with torch.serialization.safe_globals(EARLIER_NUMPY):
        return read_torch_file(path, required_key)


def _checked(path, state, required_key):
    if not isinstance(state, dict) or required_key not in state:
        raise ValueError(f"{path}: not a stagewise checkpoint (no '{required_key}')")
    return state
