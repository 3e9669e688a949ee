"""Atomic file writes: every output is written to a temporary file and renamed."""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml


@contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside `path` (ending in `suffix`, for writers that insist on one);
    rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
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
