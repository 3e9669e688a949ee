"""The artefacts' layouts: the root attribute `stagewise_layout` that names each kind of HDF5
file, the header (layout, settings, provenance) every HDF5 artefact carries, and the old names
of history columns (history.csv, checkpoints) that readers still accept."""

import json
from pathlib import Path
from typing import Any

import h5py

from .provenance import provenance

EVENTS = "events/1"
ASD = "asd/1"
TRAFO = "trafo/1"
SVD = "svd/1"
OBSERVED = "observed/1"
POSTERIOR = "posterior/1"
ATTRIBUTE = "stagewise_layout"
# history column names before 2026-12 -> today's
LEGACY_HISTORY_NAMES = {"test_loss": "validation_loss", "time_test": "time_validation"}


def write_header(f: h5py.File, layout: str, settings: dict[str, Any] | None = None) -> None:
    """Mark an open HDF5 file as `layout`, with the settings that made it and its provenance."""
    f.attrs[ATTRIBUTE] = layout
    if settings is not None:
        f.attrs["settings"] = json.dumps(settings, sort_keys=True)
    for key, value in provenance().items():
        f.attrs[key] = value


def check_layout(f: h5py.File, path: str | Path, layout: str) -> None:
    """ValueError naming the file when an open HDF5 file is not of `layout`."""
    if f.attrs.get(ATTRIBUTE) != layout:
        raise ValueError(f"{path}: root attribute '{ATTRIBUTE}' must be '{layout}' "
                         f"(found {f.attrs.get(ATTRIBUTE)!r})")
