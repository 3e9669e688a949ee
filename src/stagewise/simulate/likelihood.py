"""The exact Gaussian likelihood of the toy problem in whitened data."""

import torch

from .ringdown import ringdown_polarisations


def log_likelihood(whitened_data, parameters, simulator, asd):
    """log L = -1/2 sum |d - h(theta)|^2 over detectors and frequencies, up to a constant.

    whitened_data: complex (D, F) data divided by `asd` (D, F); parameters: {name:
    float64 (S,)} with f0, tau, snr, phase, time; simulator: data.StrainSimulator.
    Returns float64 (S,)."""
    h_plus, h_cross = ringdown_polarisations(parameters["f0"], parameters["tau"], simulator.frequencies)
    signal = simulator.signals(h_plus.to(torch.complex128), h_cross.to(torch.complex128), parameters)
    residual = whitened_data[None] - signal / asd.to(signal.device)
    return -0.5 * residual.abs().square().sum(dim=(-2, -1)).to(torch.float64)
