"""The HDF5 event-file layout shared by simulated and user-supplied data.

An event file holds N events::

    /                 attrs: stagewise_layout = "events/1", kind = "signals" | "observations"
    /labels/<name>    float, shape (N,)        one dataset per parameter (label)
    /data/inputs      float, shape (N, K)      kind "observations": the network inputs
    /data/h_plus      complex, shape (N, F)    kind "signals": noise-free polarisations
    /data/h_cross     complex, shape (N, F)
    /frequencies      float, shape (F,)        kind "signals" only: the frequency grid in Hz

Layout and shapes are checked from metadata; values (finite, labels inside their prior)
are checked in contiguous chunks, the way all data is read.
"""

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from . import layouts
from .config import Settings
from .files import atomic_path
from .priors import Prior

log = logging.getLogger(__name__)

KINDS = ("signals", "observations")
SIGNAL_DATASETS = ("h_plus", "h_cross")
OBSERVATION_DATASET = "inputs"
CHECK_CHUNK = 65536


class EventFileError(ValueError):
    """An event file that does not follow the layout; the message names file and dataset."""


def write_event_file(path: str | Path, labels: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray], kind: str,
                     frequencies: np.ndarray | None = None, settings: Settings | None = None) -> None:
    """Write one event file atomically from dicts of numpy arrays, with the settings that made it."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        layouts.write_header(f, layouts.EVENTS, settings)
        f.attrs["kind"] = kind
        for name, values in labels.items():
            f.create_dataset(f"labels/{name}", data=np.asarray(values, dtype=np.float64))
        for name, values in data.items():
            f.create_dataset(f"data/{name}", data=values)
        if frequencies is not None:
            f.create_dataset("frequencies", data=np.asarray(frequencies, dtype=np.float64))


def open_event_file(path: str | Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise EventFileError(f"{path}: event file not found") from None
    except OSError as err:
        raise EventFileError(f"{path}: not a readable HDF5 file ({err})") from None


def _check_layout(f: h5py.File, path: str | Path,
                  kind: str) -> tuple[int, tuple[int, ...], dict[str, h5py.Dataset]]:
    """(number of events, shape of one event's data, {"labels/<name>" or "data/<name>": dataset}) of
    an open file; EventFileError if it does not fit. Each h5py object is looked up once."""
    attrs = f.attrs
    if attrs.get(layouts.ATTRIBUTE) != layouts.EVENTS:
        raise EventFileError(f"{path}: root attribute '{layouts.ATTRIBUTE}' must be '{layouts.EVENTS}'")
    if attrs.get("kind") != kind:
        raise EventFileError(f"{path}: root attribute 'kind' is {attrs.get('kind')!r}, expected {kind!r}")
    datasets: dict[str, h5py.Dataset] = {}
    for group in ("labels", "data"):
        members = f.get(group)
        if members is None or not len(members):
            raise EventFileError(f"{path}: missing group '/{group}' with at least one dataset")
        datasets.update((f"{group}/{k}", d) for k, d in members.items())
    n = {k: d.shape[0] if d.ndim else None for k, d in datasets.items()}
    if len(set(n.values())) != 1 or None in n.values():
        raise EventFileError(f"{path}: datasets disagree on the number of events: {n}")
    events = next(iter(n.values()))
    assert events is not None  # checked just above
    if kind == "observations":
        inputs = datasets.get(f"data/{OBSERVATION_DATASET}")
        if inputs is None:
            raise EventFileError(f"{path}: missing dataset '/data/{OBSERVATION_DATASET}'")
        if inputs.ndim != 2 or inputs.dtype.kind != "f":
            raise EventFileError(f"{path}: '/data/{OBSERVATION_DATASET}' is {inputs.dtype} of shape {inputs.shape}, "
                                 "expected float of shape (N, K)")
        return events, inputs.shape[1:], datasets
    for name in SIGNAL_DATASETS:
        if f"data/{name}" not in datasets:
            raise EventFileError(f"{path}: missing dataset '/data/{name}'")
    frequencies = f.get("frequencies")
    if frequencies is None:
        raise EventFileError(f"{path}: missing dataset '/frequencies'")
    width = frequencies.shape[0]
    for name in SIGNAL_DATASETS:
        shape = datasets[f"data/{name}"].shape
        if shape[1:] != (width,):
            raise EventFileError(f"{path}: '/data/{name}' has shape {shape}, expected (N, {width})")
    return events, (width,), datasets


def count_splits(splits: Mapping[str, Sequence[str | Path]], kind: str = "signals",
                 priors: Mapping[str, Prior] | None = None) -> dict[str, dict[str, Any]]:
    """Events per file and total per split; `splits` maps split name to a list of paths.

    Every file is opened once, however many splits list it: its layout is checked, and with
    `priors` ({name: priors.Prior}) its values too (see check_file). Every file must hold
    the same shape of data per event."""
    checked: dict[str, tuple[int, tuple[int, ...]]]
    counts: dict[str, dict[str, Any]]
    first: tuple[str | Path, tuple[int, ...]] | None
    checked, counts, first = {}, {}, None
    for split, paths in splits.items():
        if not paths:
            raise EventFileError(f"split '{split}': no event files given")
        per_file: dict[str, int] = {}
        for path in tqdm(paths, desc=f"checking {split} files", mininterval=5, leave=False):
            if str(path) not in checked:
                checked[str(path)] = check_file(path, kind, priors)
            per_file[str(path)], shape = checked[str(path)]
            first = first or (path, shape)
            if shape != first[1]:
                raise EventFileError(f"{path}: data of shape {shape} per event, but {first[0]} has {first[1]}")
        total = sum(per_file.values())
        if total == 0:
            raise EventFileError(f"split '{split}': the files hold no events ({', '.join(per_file)})")
        counts[split] = {"total": total, "files": per_file}
        log.info("%s: %d events in %d files", split, total, len(per_file))
    return counts


def check_file(path: str | Path, kind: str = "signals",
               priors: Mapping[str, Prior] | None = None) -> tuple[int, tuple[int, ...]]:
    """(number of events, shape of one event's data) of one file, opened once: its layout, and with
    `priors` its values (labels finite and inside their priors, observation inputs finite), read in
    contiguous chunks. EventFileError naming the file, the dataset, the count and the first index."""
    with open_event_file(path) as f:
        events, shape, datasets = _check_layout(f, path, kind)
        if priors is not None:
            for name, prior in priors.items():
                if f"labels/{name}" not in datasets:
                    raise EventFileError(f"{path}: missing dataset '/labels/{name}'")
                _check_chunks(path, f"labels/{name}", datasets[f"labels/{name}"], prior)
            if kind == "observations":
                _check_chunks(path, f"data/{OBSERVATION_DATASET}", datasets[f"data/{OBSERVATION_DATASET}"], None)
    return events, shape


def _check_chunks(path: str | Path, name: str, dataset: h5py.Dataset, prior: Prior | None) -> None:
    bad = first = None
    count = 0
    for start in range(0, dataset.shape[0], CHECK_CHUNK):
        values = dataset[start:start + CHECK_CHUNK]
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not finite.all():
            bad, count = "NaN or inf", count + int((~finite).sum())
            first = first if first is not None else start + int(np.argmin(finite))
        elif prior is not None and bad is None:
            outside = (values < prior.low) | (values > prior.high)
            if outside.any():
                index = start + int(np.argmax(outside))
                raise EventFileError(f"{path}: '/{name}' has {int(outside.sum())} value(s) outside its prior "
                                     f"[{prior.low}, {prior.high}], the first at event {index} ({dataset[index]})")
    if bad:
        raise EventFileError(f"{path}: '/{name}' holds NaN or inf in {count} event(s), the first at event {first}")


def split_layout(paths: Sequence[str | Path],
                 data_keys: Sequence[str]) -> tuple[list[int], dict[str, tuple[tuple[int, ...], np.dtype]]]:
    """(events per file, {data key: (shape of one event, numpy dtype)}), from metadata; the shapes
    and dtypes are the first file's (the count_events step checked that every file agrees)."""
    sizes: list[int]
    per_event: dict[str, tuple[tuple[int, ...], np.dtype]] | None
    sizes, per_event = [], None
    for path in paths:
        with open_event_file(path) as f:
            datasets = [f["data"][k] for k in data_keys]
            sizes.append(datasets[0].shape[0])
            per_event = per_event or {k: (d.shape[1:], d.dtype) for k, d in zip(data_keys, datasets, strict=True)}
    assert per_event is not None  # `paths` is never empty: count_events refuses an empty split
    return sizes, per_event


def read_frequencies(path: str | Path) -> np.ndarray:
    with open_event_file(path) as f:
        return f["frequencies"][()]


def read_events(paths: Sequence[str | Path], labels: Sequence[str], data_keys: Sequence[str],
                limit: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Concatenate the named labels and data of `paths` into memory, up to `limit` events.

    Returns (labels dict of float64 arrays, data dict of arrays)."""
    out_labels: dict[str, list[np.ndarray]] = {name: [] for name in labels}
    out_data: dict[str, list[np.ndarray]] = {name: [] for name in data_keys}
    remaining = np.inf if limit is None else limit
    for path in paths:
        if remaining <= 0:
            break
        with open_event_file(path) as f:
            for group, names in (("labels", labels), ("data", data_keys)):
                for name in names:
                    if name not in f.get(group, {}):
                        raise EventFileError(f"{path}: missing dataset '/{group}/{name}'")
            n = int(min(f["data"][data_keys[0]].shape[0], remaining))
            for name in labels:
                out_labels[name].append(f["labels"][name][:n])
            for name in data_keys:
                out_data[name].append(f["data"][name][:n])
            remaining -= n
    labels_arr = {k: np.concatenate(v) for k, v in out_labels.items()}
    data_arr = {k: np.concatenate(v) for k, v in out_data.items()}
    return labels_arr, data_arr


def iter_chunks(paths: Sequence[str | Path], labels: Sequence[str], data_keys: Sequence[str], chunk_size: int,
                num_chunks: int) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield `num_chunks` consecutive chunks of `chunk_size` events, read file by file.

    Each chunk is (labels dict, data dict) of numpy arrays; only one chunk (plus one
    block of the current file) is in memory at a time. Each file is opened once; when the
    files hold fewer than chunk_size * num_chunks events, EventFileError follows the last
    full chunk."""
    if not paths:
        raise EventFileError("no event files given")
    keys = [("labels", k) for k in labels] + [("data", k) for k in data_keys]
    buffer: dict[tuple[str, str], list[np.ndarray]] = {key: [] for key in keys}
    buffered = emitted = 0
    for path in paths:
        with open_event_file(path) as f:
            n = f["data"][data_keys[0]].shape[0]
            for start in range(0, n, chunk_size):
                for group, name in keys:
                    buffer[group, name].append(f[group][name][start : start + chunk_size])
                buffered += min(chunk_size, n - start)
                while buffered >= chunk_size:
                    joined = {key: parts[0] if len(parts) == 1 else np.concatenate(parts)
                              for key, parts in buffer.items()}
                    yield (
                        {name: joined["labels", name][:chunk_size] for name in labels},
                        {name: joined["data", name][:chunk_size] for name in data_keys},
                    )
                    emitted += 1
                    if emitted == num_chunks:
                        return
                    buffer = {key: [value[chunk_size:]] if len(value) > chunk_size else []
                              for key, value in joined.items()}
                    buffered -= chunk_size
    raise EventFileError(f"{len(paths)} file(s) starting with {paths[0]} hold {emitted * chunk_size + buffered} "
                         f"events, but {num_chunks} batches of {chunk_size} need {chunk_size * num_chunks}")
