"""Frequency-domain polarisations of a damped sinusoid that starts sharply at t = 0.

h_plus(t) = exp(-t / tau) cos(2 pi f0 t), h_cross(t) = exp(-t / tau) sin(2 pi f0 t) for
t >= 0, Fourier transformed in closed form with h(f) = int h(t) exp(-2 pi i f t) dt.
A phase phi rotates the pair (done in detectors.Detectors.project). The overall
amplitude is irrelevant: signals are scaled to a network SNR.
"""

import math

import torch


def ringdown_polarisations(f0: torch.Tensor, tau: torch.Tensor,
                           frequencies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h_plus, h_cross: complex128 (N, F) for f0 (Hz), tau (s) float64 (N,) on frequencies (F,)."""
    rate = (1.0 / tau)[:, None]
    f = frequencies[None, :]
    below = 1.0 / (rate + 2j * math.pi * (f - f0[:, None]))
    above = 1.0 / (rate + 2j * math.pi * (f + f0[:, None]))
    return 0.5 * (below + above), (below - above) / 2j
