"""The observed-data layout: events whose posterior (or prediction) `infer` computes.

An observed-data file holds N events::

    /                    attrs: stagewise_layout = "observed/1", kind = "signals" | "observations"
    /event_id            int, shape (N,)            unique per event; seeds its posterior draws
    /frequencies         float, shape (F,)          kind "signals": the model's frequency grid in Hz
    /strain/<detector>   complex, shape (N, F)      kind "signals": measured, unwhitened data
    /asds/<detector>     float, shape (N, F)        kind "signals": the ASD each event was measured with
    /data/inputs         float, shape (N, K)        kind "observations": the network inputs
    /labels/<name>       float, shape (N,)          optional: the truth of injections

ASDs follow the convention of detectors.py: noise is ASD * (x + i y) with x, y ~ N(0, 1).
Layout and shapes are checked from metadata when the file is opened, values (finite data,
ASDs > 0) block by block as they are read; every error names the file and the dataset.
"""

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import layouts
from .config import Settings
from .files import atomic_path


class ObservedFileError(ValueError):
    """An observed-data file that does not fit the layout or the model; the message names the file."""


def write_observed_file(path: str | Path, event_id: Sequence[int] | np.ndarray, *,
                        frequencies: np.ndarray | None = None, strain: Mapping[str, np.ndarray] | None = None,
                        asds: Mapping[str, np.ndarray] | None = None, inputs: np.ndarray | None = None,
                        labels: Mapping[str, np.ndarray] | None = None, settings: Settings | None = None) -> None:
    """Write an observed-data file atomically: `strain` and `asds` ({detector: (N, F)}) with
    `frequencies` for signals, or `inputs` (N, K) for observations."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        layouts.write_header(f, layouts.OBSERVED, settings)
        f.attrs["kind"] = "observations" if inputs is not None else "signals"
        f["event_id"] = np.asarray(event_id, dtype=np.int64)
        if inputs is not None:
            f["data/inputs"] = np.asarray(inputs)
        else:
            assert strain is not None and asds is not None and frequencies is not None  # signals need all three
            f["frequencies"] = np.asarray(frequencies, dtype=np.float64)
            for detector in strain:
                f[f"strain/{detector}"] = np.asarray(strain[detector], dtype=np.complex128)
                f[f"asds/{detector}"] = np.asarray(asds[detector], dtype=np.float64)
        for name, values in (labels or {}).items():
            f[f"labels/{name}"] = np.asarray(values, dtype=np.float64)


class ObservedFile:
    """An observed-data file, checked against what a model expects when it is opened.

    For signals: the model's `detectors` and `frequencies`; for observations: `num_inputs` (K)."""

    def __init__(self, path: str | Path, kind: str, *, detectors: Sequence[str] = (),
                 frequencies: np.ndarray | None = None, num_inputs: int | None = None) -> None:
        self.path, self.kind, self.detectors = str(path), kind, list(detectors)
        try:
            self.file = h5py.File(path, "r")
        except FileNotFoundError:
            raise ObservedFileError(f"{path}: observed-data file not found") from None
        except OSError as err:
            raise ObservedFileError(f"{path}: not a readable HDF5 file ({err})") from None
        try:
            self._check(frequencies, num_inputs)
        except BaseException:
            self.file.close()
            raise

    def _error(self, message: str) -> ObservedFileError:
        return ObservedFileError(f"{self.path}: {message}")

    def _check(self, frequencies: np.ndarray | None, num_inputs: int | None) -> None:
        f = self.file
        layout = f.attrs.get(layouts.ATTRIBUTE)
        if layout != layouts.OBSERVED:
            hint = " (an event file for training, not observed data)" if layout == layouts.EVENTS else ""
            raise self._error(f"root attribute '{layouts.ATTRIBUTE}' must be '{layouts.OBSERVED}', "
                              f"found {layout!r}{hint}")
        if f.attrs.get("kind") != self.kind:
            raise self._error(f"root attribute 'kind' is {f.attrs.get('kind')!r}, but the model infers {self.kind}")
        if "event_id" not in f or f["event_id"].ndim != 1 or f["event_id"].dtype.kind not in "iu":
            raise self._error("missing integer dataset '/event_id' of shape (N,)")
        self.event_id = f["event_id"][()].astype(np.int64)
        self.num_events = len(self.event_id)
        if self.num_events == 0:
            raise self._error("holds no events ('/event_id' is empty)")
        if len(np.unique(self.event_id)) != self.num_events:
            raise self._error("'/event_id' repeats an id: each event needs its own (it seeds the event's draws)")
        if self.kind == "observations":
            self._expect("data/inputs", (self.num_events, num_inputs), "f")
        else:
            assert frequencies is not None  # a signal model always knows its grid
            grid = f.get("frequencies")
            if grid is None or grid.shape != frequencies.shape or not np.allclose(grid[()], frequencies, rtol=1e-9,
                                                                                  atol=0):
                found = "missing" if grid is None else f"{grid.shape[0]} bins from {grid[0]:g} to {grid[-1]:g} Hz"
                raise self._error(f"'/frequencies' ({found}) differs from the model's grid ({len(frequencies)} bins "
                                  f"from {frequencies[0]:g} to {frequencies[-1]:g} Hz)")
            for group in ("strain", "asds"):
                present = sorted(f.get(group, {}))
                if present != sorted(self.detectors):
                    raise self._error(f"'/{group}' holds detectors {present}, the model's are {self.detectors}")
                for detector in self.detectors:
                    self._expect(f"{group}/{detector}", (self.num_events, len(frequencies)),
                                 "c" if group == "strain" else "f")
        self.label_names = sorted(f.get("labels", {}))
        for name in self.label_names:
            self._expect(f"labels/{name}", (self.num_events,), "fiu")

    def _expect(self, name: str, shape: tuple[int | None, ...], kinds: str) -> None:
        dataset = self.file.get(name)
        if dataset is None:
            raise self._error(f"missing dataset '/{name}'")
        matches = len(dataset.shape) == len(shape) and all(
            e is None or e == s for s, e in zip(dataset.shape, shape, strict=True))
        if not matches or dataset.dtype.kind not in kinds:
            wanted = "complex" if kinds == "c" else "float"
            raise self._error(f"'/{name}' is {dataset.dtype} of shape {dataset.shape}, expected {wanted} of shape "
                              f"({', '.join('K' if e is None else str(e) for e in shape)})")

    def read(self, start: int, stop: int) -> dict[str, Any]:
        """Events start..stop: {"event_id", "strain" complex128 (n, D, F), "asds" float64 (n, D, F)} for
        signals or {"event_id", "inputs" (n, K)} for observations, and "labels" {name: (n,)}; values checked."""
        f = self.file
        block: dict[str, Any] = {"event_id": self.event_id[start:stop],
                                 "labels": {n: f["labels"][n][start:stop].astype(np.float64)
                                            for n in self.label_names}}
        if self.kind == "observations":
            block["inputs"] = self._finite("data/inputs", f["data/inputs"][start:stop], start)
        else:
            block["strain"] = np.stack([self._finite(f"strain/{d}", f["strain"][d][start:stop], start)
                                        for d in self.detectors], axis=1).astype(np.complex128)
            asds = np.stack([self._finite(f"asds/{d}", f["asds"][d][start:stop], start) for d in self.detectors],
                            axis=1).astype(np.float64)
            if (asds <= 0).any():
                event = start + int(np.argmax((asds <= 0).reshape(len(asds), -1).any(axis=1)))
                raise self._error(f"'/asds' holds values <= 0, the first in event {event} "
                                  f"(event_id {self.event_id[event]}): an ASD must be positive")
            block["asds"] = asds
        return block

    def _finite(self, name: str, values: np.ndarray, start: int) -> np.ndarray:
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not finite.all():
            event = start + int(np.argmin(finite))
            raise self._error(f"'/{name}' holds NaN or inf in {int((~finite).sum())} event(s), the first is event "
                              f"{event} (event_id {self.event_id[event]})")
        return values

    def blocks(self, size: int) -> Iterator[dict[str, Any]]:
        """The events in blocks of `size`, read one block at a time."""
        for start in range(0, self.num_events, size):
            yield self.read(start, min(start + size, self.num_events))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ObservedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
