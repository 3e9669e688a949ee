"""Logging of a workflow step into its rule's log file, tqdm progress included."""

import logging
import sys
from pathlib import Path


def log_to_file(path: str | Path, prefix: str = "", level: int = logging.INFO) -> None:
    """Send logging records of `level` and above and stderr (where tqdm writes progress) to `path`;
    `prefix` (e.g. "rank 1") starts every record."""
    stream = open(path, "a", buffering=1)
    sys.stderr = stream
    logging.basicConfig(
        stream=stream, level=level, force=True,
        format="%(asctime)s %(levelname)s " + (f"{prefix} " if prefix else "") + "%(name)s: %(message)s",
    )
