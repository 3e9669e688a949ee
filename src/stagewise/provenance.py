"""What made an artefact: package versions, git revision, host and time."""

import datetime
import functools
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("stagewise", "torch", "nflows", "numpy", "h5py", "snakemake")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def _git_revision() -> tuple[str, bool]:
    """(revision, dirty) of the repository holding this package, or ("unknown", False)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return rev, bool(status.strip())


def provenance() -> dict[str, str]:
    """A flat dict of strings describing the software and machine that made an artefact."""
    rev, dirty = _git_revision()
    info = {f"version_{p}": _version(p) for p in PACKAGES}
    info.update(
        git_revision=rev,
        git_dirty=str(dirty),
        host=socket.gethostname(),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return info
