"""P-P calibration: where each true value falls in its posterior."""

import numpy as np
from scipy import stats


def credible_levels(samples, truths):
    """Fraction of posterior samples below the truth: samples (N, S, P), truths (N, P) -> (N, P).

    For a calibrated posterior each column is uniform on [0, 1]."""
    return (samples < truths[:, None, :]).mean(axis=1)


def ks_pvalues(levels, names):
    """{name: KS-test p-value of the levels against U(0, 1)}."""
    return {name: float(stats.kstest(levels[:, i], "uniform").pvalue) for i, name in enumerate(names)}


def pp_curve(levels, grid):
    """Fraction of injections whose level is below each credible level in `grid`: (len(grid), P)."""
    return (levels[None, :, :] <= grid[:, None, None]).mean(axis=1)
