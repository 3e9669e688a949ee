"""P-P calibration: where each true value falls in its posterior."""

import numpy as np
from scipy import stats


def credible_levels(samples, truths, weights=None):
    """Posterior mass below the truth: samples (N, S, P), truths (N, P), optional weights
    (N, S) summing to one per injection -> (N, P).

    For a calibrated posterior each column is uniform on [0, 1]."""
    below = samples < truths[:, None, :]
    if weights is None:
        return below.mean(axis=1)
    return np.einsum("nsp,ns->np", below, weights)


def ks_pvalues(levels, names):
    """{name: KS-test p-value of the levels against U(0, 1)}."""
    return {name: float(stats.kstest(levels[:, i], "uniform").pvalue) for i, name in enumerate(names)}


def combined_pvalue(pvalues):
    """Fisher's combination of the per-parameter p-values (as bilby's P-P plot reports it)."""
    return float(stats.combine_pvalues(list(pvalues.values()), method="fisher").pvalue)


def pp_curve(levels, grid):
    """Fraction of injections whose level is below each credible level in `grid`: (len(grid), P)."""
    return (levels[None, :, :] <= grid[:, None, None]).mean(axis=1)
