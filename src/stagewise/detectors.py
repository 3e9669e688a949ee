"""Detector response, whitening and ASD files for data made of signals plus noise.

Convention: frequency-domain noise in a detector is n(f) = ASD(f) * (x + i y) with
x, y ~ N(0, 1). Whitening divides by the ASD, so whitened noise has independent
standard-normal real and imaginary parts, the log-likelihood of data d given a
signal h is -1/2 sum |(d - h) / ASD|^2, and the optimal SNR is sqrt(sum |h / ASD|^2).
"""

import math

import h5py
import numpy as np
import torch

from .files import atomic_path

ASD_LAYOUT = "asd/1"


class Detectors:
    """Fixed antenna factors and arrival-time offsets of a detector network."""

    def __init__(self, spec):
        self.names = list(spec)
        self.antenna_plus = torch.tensor([spec[d]["antenna_plus"] for d in self.names], dtype=torch.float64)
        self.antenna_cross = torch.tensor([spec[d]["antenna_cross"] for d in self.names], dtype=torch.float64)
        self.time_offset = torch.tensor([spec[d]["time_offset"] for d in self.names], dtype=torch.float64)

    def project(self, h_plus, h_cross, phase, time, frequencies):
        """Strain in each detector.

        h_plus, h_cross: complex (B, F) polarisations at phase 0 and time 0.
        phase (rad), time (s): float64 (B,). frequencies: float64 (F,) in Hz.
        Returns complex (B, D, F).
        """
        device, real = h_plus.device, h_plus.real.dtype
        cos, sin = (f(phase).to(device, real)[:, None] for f in (torch.cos, torch.sin))
        plus = cos * h_plus - sin * h_cross
        cross = sin * h_plus + cos * h_cross
        fp = self.antenna_plus.to(device, real)[None, :, None]
        fx = self.antenna_cross.to(device, real)[None, :, None]
        strain = fp * plus[:, None, :] + fx * cross[:, None, :]
        delay = time.to(device, torch.float64)[:, None, None] + self.time_offset.to(device)[None, :, None]
        angle = (-2 * math.pi * delay * frequencies.to(device)).to(real)  # in float64, then the data's precision
        return strain * torch.polar(torch.ones_like(angle), angle)


def optimal_snr(strain, asd):
    """sqrt(sum |h / ASD|^2) over detectors and frequencies; strain (B, D, F), asd (D, F) or (B, D, F)."""
    return torch.sqrt(((strain.real.square() + strain.imag.square()) / asd.square()).sum(dim=(-2, -1)))


def write_asd_file(path, frequencies, asds, attrs=None):
    """Write ASDs atomically; `asds` maps detector name to an array (num_asds, F)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["stagewise_layout"] = ASD_LAYOUT
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        f.create_dataset("frequencies", data=np.asarray(frequencies, dtype=np.float64))
        for name, values in asds.items():
            f.create_dataset(f"asds/{name}", data=np.asarray(values, dtype=np.float64))


def read_asd_file(path, detector_names, frequencies):
    """ASDs as float64 array (num_asds, D, F), checked against the expected frequency grid."""
    try:
        f = h5py.File(path, "r")
    except (FileNotFoundError, OSError) as err:
        raise ValueError(f"{path}: cannot open ASD file ({err})") from None
    with f:
        if f.attrs.get("stagewise_layout") != ASD_LAYOUT:
            raise ValueError(f"{path}: root attribute 'stagewise_layout' must be '{ASD_LAYOUT}'")
        if "frequencies" not in f or not np.allclose(f["frequencies"][()], frequencies):
            raise ValueError(f"{path}: '/frequencies' differs from the event files' frequency grid")
        missing = [d for d in detector_names if f"asds/{d}" not in f]
        if missing:
            raise ValueError(f"{path}: missing dataset(s) {', '.join('/asds/' + d for d in missing)}")
        asds = np.stack([f["asds"][d][()] for d in detector_names], axis=1)
    if not np.all(np.isfinite(asds)) or np.any(asds <= 0):
        raise ValueError(f"{path}: ASDs must be finite and positive")
    return asds
