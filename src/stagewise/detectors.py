"""Detector response, whitening and ASD files for data made of signals plus noise.

Convention: frequency-domain noise in a detector is n(f) = ASD(f) * (x + i y) with
x, y ~ N(0, 1). Whitening divides by the ASD, so whitened noise has independent
standard-normal real and imaginary parts, the log-likelihood of data d given a
signal h is -1/2 sum |(d - h) / ASD|^2, and the optimal SNR is sqrt(sum |h / ASD|^2).
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import layouts
from .config import Settings
from .files import atomic_path


class Detectors:
    """Fixed antenna factors and arrival-time offsets of a detector network."""

    names: list[str]
    antenna_plus: torch.Tensor  # float64 (D,)
    antenna_cross: torch.Tensor  # float64 (D,)
    time_offset: torch.Tensor  # float64 (D,) in s

    def __init__(self, spec: Mapping[str, Mapping[str, Any]]) -> None:
        self.names = list(spec)
        self.antenna_plus = torch.tensor([spec[d]["antenna_plus"] for d in self.names], dtype=torch.float64)
        self.antenna_cross = torch.tensor([spec[d]["antenna_cross"] for d in self.names], dtype=torch.float64)
        self.time_offset = torch.tensor([spec[d]["time_offset"] for d in self.names], dtype=torch.float64)

    def project(self, h_plus: torch.Tensor, h_cross: torch.Tensor, phase: torch.Tensor, time: torch.Tensor,
                frequencies: torch.Tensor) -> torch.Tensor:
        """Strain in each detector.

        h_plus, h_cross: complex (B, F) polarisations at phase 0 and time 0.
        phase (rad), time (s): float64 (B,). frequencies: float64 (F,) in Hz.
        Returns complex (B, D, F).
        """
        real = h_plus.real.dtype
        shift = self.time_shift(time, frequencies, real)[:, None] * self.offset_shift(frequencies, real).to(time.device)
        return self.response(h_plus, h_cross, phase) * shift

    def response(self, h_plus: torch.Tensor, h_cross: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """Strain in each detector at time 0 without the detectors' time offsets: complex (B, D, F),
        in the polarisations' precision.

        F+ (cos h+ - sin hx) + Fx (sin h+ + cos hx) = a h+ + b hx, with the real (B, D)
        weights a and b worked out first: two real products per element."""
        real = h_plus.real.dtype
        cos, sin = torch.cos(phase)[:, None], torch.sin(phase)[:, None]
        fp, fx = (f.to(phase.device)[None] for f in (self.antenna_plus, self.antenna_cross))
        a, b = (w.to(h_plus.device, real)[:, :, None, None] for w in (fp * cos + fx * sin, fx * cos - fp * sin))
        strain = (a * torch.view_as_real(h_plus)[:, None]).addcmul_(b, torch.view_as_real(h_cross)[:, None])
        return torch.view_as_complex(strain)

    @staticmethod
    def time_shift(time: torch.Tensor, frequencies: torch.Tensor, dtype: torch.dtype,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
        """exp(-2 pi i f time), times `scale` (B,) when given: complex (B, F) of real precision
        `dtype`, the phase worked out in float64."""
        angle = (-2 * math.pi * time.to(torch.float64)[:, None] * frequencies.to(time.device, torch.float64))
        angle = angle.to(dtype)
        return torch.polar(torch.ones_like(angle) if scale is None else scale.to(dtype)[:, None], angle)

    def offset_shift(self, frequencies: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """exp(-2 pi i f offset) of each detector's arrival-time offset: complex (D, F)."""
        angle = (-2 * math.pi * self.time_offset[:, None] * frequencies.cpu().to(torch.float64)).to(dtype)
        return torch.polar(torch.ones_like(angle), angle)


def write_asd_file(path: str | Path, frequencies: np.ndarray | torch.Tensor, asds: Mapping[str, np.ndarray],
                   settings: Settings | None = None) -> None:
    """Write ASDs atomically; `asds` maps detector name to an array (num_asds, F)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        layouts.write_header(f, layouts.ASD, settings)
        f.create_dataset("frequencies", data=np.asarray(frequencies, dtype=np.float64))
        for name, values in asds.items():
            f.create_dataset(f"asds/{name}", data=np.asarray(values, dtype=np.float64))


def read_asd_file(path: str | Path, detector_names: Sequence[str], frequencies: np.ndarray) -> np.ndarray:
    """ASDs as float64 array (num_asds, D, F), checked against the expected frequency grid."""
    try:
        f = h5py.File(path, "r")
    except (FileNotFoundError, OSError) as err:
        raise ValueError(f"{path}: cannot open ASD file ({err})") from None
    with f:
        layouts.check_layout(f, path, layouts.ASD)
        if "frequencies" not in f or not np.allclose(f["frequencies"][()], frequencies):
            raise ValueError(f"{path}: '/frequencies' differs from the event files' frequency grid")
        missing = [d for d in detector_names if f"asds/{d}" not in f]
        if missing:
            raise ValueError(f"{path}: missing dataset(s) {', '.join('/asds/' + d for d in missing)}")
        asds = np.stack([f["asds"][d][()] for d in detector_names], axis=1)
    if not np.all(np.isfinite(asds)) or np.any(asds <= 0):
        raise ValueError(f"{path}: ASDs must be finite and positive")
    return asds
