"""Analytic ASDs: an aLIGO-like fiducial curve per detector and a set of varied ASDs."""

import math

import torch


def fiducial_asd(frequencies: torch.Tensor, level: float) -> torch.Tensor:
    """A seismic wall below ~40 Hz, a flat bucket and a rising shot-noise tail; float64 (F,)."""
    f = frequencies
    return level * torch.sqrt((40.0 / f) ** 8 + 1.0 + (f / 200.0) ** 2)


def varied_asds(fiducial: torch.Tensor, num_asds: int, level_scatter: float, shape_scatter: float,
                generator: torch.Generator) -> torch.Tensor:
    """num_asds ASDs (num_asds, F): fiducial x a random level x smooth random bumps.

    log ASD changes by N(0, level_scatter) overall and by three Gaussian bumps (width
    a tenth of the band, centres uniform over the frequency bins) with amplitudes
    N(0, shape_scatter)."""
    num_bins = fiducial.shape[0]
    x = torch.linspace(0.0, 1.0, num_bins, dtype=torch.float64)
    level = level_scatter * torch.randn(num_asds, 1, generator=generator, dtype=torch.float64)
    centres = torch.rand(num_asds, 3, 1, generator=generator, dtype=torch.float64)
    amplitudes = shape_scatter * torch.randn(num_asds, 3, 1, generator=generator, dtype=torch.float64)
    bumps = (amplitudes * torch.exp(-0.5 * ((x - centres) / 0.1) ** 2)).sum(1)
    return fiducial[None, :] * torch.exp(level + bumps)


def frequency_grid(f_min: float, f_max: float, delta_f: float) -> torch.Tensor:
    """Frequencies f_min, f_min + delta_f, ... <= f_max in Hz, float64."""
    num_bins = int(math.floor((f_max - f_min) / delta_f + 1e-9)) + 1
    return f_min + delta_f * torch.arange(num_bins, dtype=torch.float64)
