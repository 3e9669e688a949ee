"""Logging of a workflow step into its rule's log file, tqdm progress included."""

import logging
import sys
from pathlib import Path


def log_to_file(path: str | Path) -> None:
    """Send logging records and stderr (where tqdm writes progress) to `path`."""
    stream = open(path, "a", buffering=1)
    sys.stderr = stream
    logging.basicConfig(
        stream=stream, level=logging.INFO, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
