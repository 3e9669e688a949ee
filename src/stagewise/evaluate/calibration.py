"""P-P calibration: where each true value falls in its posterior."""

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats


def credible_levels(samples: np.ndarray, truths: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Posterior mass below the truth: samples (N, S, P), truths (N, P), optional weights
    (N, S) summing to one per injection -> (N, P).

    For a calibrated posterior each column is uniform on [0, 1]."""
    below = samples < truths[:, None, :]
    if weights is None:
        return below.mean(axis=1)
    return np.einsum("nsp,ns->np", below, weights)


def ks_pvalues(levels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """{name: KS-test p-value of the levels against U(0, 1)}."""
    return {name: float(stats.kstest(levels[:, i], "uniform").pvalue) for i, name in enumerate(names)}


def combined_pvalue(pvalues: Mapping[str, float]) -> float:
    """Fisher's combination of the per-parameter p-values (as bilby's P-P plot reports it)."""
    return float(stats.combine_pvalues(list(pvalues.values()), method="fisher").pvalue)


def pp_curve(levels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Fraction of injections whose level is below each credible level in `grid`: (len(grid), P)."""
    return (levels[None, :, :] <= grid[:, None, None]).mean(axis=1)


def gaussian_summary(names: Sequence[str], truth_network: np.ndarray, mean_network: np.ndarray,
                     sigma_network: np.ndarray, truth: np.ndarray, mean: np.ndarray) -> dict[str, dict[str, float]]:
    """Per label: residuals of the predicted mean in physical units, pulls and the coverage of the
    ±1σ and ±1.96σ intervals in network (trafo) space, where a Gaussian prediction lives.

    All arrays (N, P). A calibrated prediction has pull_mean 0, pull_std 1, coverage 0.68 and 0.95."""
    pulls = (mean_network - truth_network) / sigma_network
    residuals = mean - truth
    return {name: {
        "residual_mean": float(residuals[:, i].mean()), "residual_std": float(residuals[:, i].std()),
        "pull_mean": float(pulls[:, i].mean()), "pull_std": float(pulls[:, i].std()),
        "coverage_68": float((np.abs(pulls[:, i]) < 1.0).mean()),
        "coverage_95": float((np.abs(pulls[:, i]) < 1.959964).mean()),
    } for i, name in enumerate(names)}
