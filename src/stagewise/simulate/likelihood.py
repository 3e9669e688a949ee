"""The exact Gaussian likelihood of the toy problem in whitened data, at given phases or
marginalised over a uniform phase.

The detector strain at phase phi is s = k(phi) (cos phi A + sin phi B), with A and B the
strain at phases 0 and pi/2 and k(phi) the factor that scales it to the network SNR
(defined with the fiducial ASD). log L(phi) therefore needs only a few inner products of
d, A and B, and the phase integral is a cheap sum over a grid: the integrand is smooth
and periodic, so the trapezoidal rule converges exponentially with the grid size.
"""

import math
from collections.abc import Mapping
from typing import Any

import torch

from .ringdown import ringdown_polarisations

PHASE_POINTS = 1024


def _inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Re sum conj(x) y over detectors and frequencies: (S,)."""
    return (x.conj() * y).real.sum(dim=(-2, -1))


def log_likelihood_on_phases(whitened_data: torch.Tensor, parameters: Mapping[str, torch.Tensor], simulator: Any,
                             asd: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Normalised log L of whitened data at each phase: float64 (S, K).

    whitened_data: complex (D, F) data divided by `asd` (D, F); parameters: {name: float64
    (S,)} with f0, tau, snr, time; phases: float64 (S, K) or (1, K) in rad; simulator:
    data.StrainSimulator (frequencies, detectors, fiducial ASD; Any here: simulate must not import data)."""
    device = whitened_data.device
    frequencies = simulator.frequencies.to(device)
    h_plus, h_cross = ringdown_polarisations(parameters["f0"].to(device), parameters["tau"].to(device), frequencies)
    zero, time = torch.zeros_like(h_plus.real[:, 0]), parameters["time"].to(device, torch.float64)
    a = simulator.detectors.project(h_plus, h_cross, zero, time, frequencies)
    b = simulator.detectors.project(-h_cross, h_plus, zero, time, frequencies)
    d = whitened_data.to(torch.complex128)
    asd, fiducial = asd.to(device, torch.float64), simulator.fiducial_asd.to(device, torch.float64)
    aw, bw, af, bf = a / asd, b / asd, a / fiducial, b / fiducial
    cos, sin = torch.cos(phases.to(device)), torch.sin(phases.to(device))

    def quadratic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cos**2 * _inner(x, x)[:, None] + sin**2 * _inner(y, y)[:, None] + 2 * cos * sin * _inner(x, y)[:, None]

    scale = parameters["snr"].to(device, torch.float64)[:, None] / torch.sqrt(quadratic(af, bf))
    overlap = scale * (cos * _inner(aw, d[None])[:, None] + sin * _inner(bw, d[None])[:, None])
    signal_norm = scale**2 * quadratic(aw, bw)
    data_norm = d.abs().square().sum()
    return overlap - 0.5 * (data_norm + signal_norm) - d.numel() * math.log(2 * math.pi)


def log_likelihood(whitened_data: torch.Tensor, parameters: Mapping[str, torch.Tensor], simulator: Any,
                   asd: torch.Tensor) -> torch.Tensor:
    """Normalised log L = -1/2 sum |d - h(theta)|^2 - n log(2 pi) for the n complex bins
    of whitened data; parameters also hold `phase`. Returns float64 (S,)."""
    phases = parameters["phase"].to(torch.float64)[:, None]
    return log_likelihood_on_phases(whitened_data, parameters, simulator, asd, phases)[:, 0]


def phase_marginalised_log_likelihood(whitened_data: torch.Tensor, parameters: Mapping[str, torch.Tensor],
                                      simulator: Any, asd: torch.Tensor,
                                      num_phases: int = PHASE_POINTS) -> torch.Tensor:
    """log of the mean of L over a phase uniform on [0, 2 pi), by the trapezoidal rule: (S,)."""
    phases = torch.arange(num_phases, dtype=torch.float64)[None] * (2 * math.pi / num_phases)
    values = log_likelihood_on_phases(whitened_data, parameters, simulator, asd, phases)
    return torch.logsumexp(values, dim=1) - math.log(num_phases)


def noise_log_likelihood(whitened_data: torch.Tensor) -> float:
    """log L of whitened data (D, F) under the noise-only hypothesis h = 0, normalised as log_likelihood:
    the log noise evidence."""
    d = whitened_data.to(torch.complex128)
    return float(-0.5 * d.abs().square().sum() - d.numel() * math.log(2 * math.pi))
