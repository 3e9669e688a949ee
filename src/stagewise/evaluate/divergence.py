"""How far the network's posterior is from the exact one: per parameter the Jensen-Shannon divergence
(in nat) of the marginal of the network's samples and that of the importance-weighted samples, which
is the exact posterior wherever the network covers it.

Each marginal is a Gaussian kernel density estimate on a common grid, both with one bandwidth
(Silverman's, from the weighted samples and their effective number): equal posteriors then give a
divergence near 0 (about 0.001 nat for a few hundred effective samples), disjoint ones ln 2 = 0.69.
"""

import math
from collections.abc import Sequence

import numpy as np

LN2 = math.log(2)  # the divergence of disjoint distributions
GRID_POINTS = 512
TAIL = 1e-3  # the grid spans both sets' [TAIL, 1 - TAIL] quantiles, widened by 4 bandwidths


def weighted_quantiles(values: np.ndarray, weights: np.ndarray | None, quantiles: Sequence[float]) -> np.ndarray:
    """Quantiles of samples (S,) with weights (S,) (None: equal), from the weighted empirical CDF."""
    order = np.argsort(values)
    cumulative = np.cumsum(np.ones(len(values)) if weights is None else weights[order])
    if cumulative[-1] <= 0:
        return np.full(len(quantiles), np.nan)
    index = np.searchsorted(cumulative / cumulative[-1], quantiles)
    return values[order][np.minimum(index, len(values) - 1)]


def bandwidth(values: np.ndarray, weights: np.ndarray) -> float:
    """Silverman's bandwidth 0.9 min(std, IQR / 1.34) n_eff^(-1/5) of weighted samples."""
    weights = weights / weights.sum()
    n_eff = 1.0 / np.square(weights).sum()
    mean = np.dot(weights, values)
    std = float(np.sqrt(np.dot(weights, np.square(values - mean))))
    q25, q75 = weighted_quantiles(values, weights, [0.25, 0.75])
    scale = min(std, (q75 - q25) / 1.34) or std
    return 0.9 * scale * n_eff ** -0.2


def _density(values: np.ndarray, weights: np.ndarray | None, edges: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """A binned kernel density estimate on the grid's bins, normalised to sum 1."""
    counts, _ = np.histogram(values, bins=edges, weights=weights)
    smooth = np.convolve(counts, kernel, mode="same")
    return smooth / smooth.sum()


def marginal_jsd(network: np.ndarray, exact: np.ndarray, weights: np.ndarray) -> float:
    """JSD in nat of network samples (S,) and exact samples (n,) with weights (n,) of one parameter."""
    keep = weights > 0
    exact, weights = exact[keep], weights[keep]
    lows, highs = zip(weighted_quantiles(network, None, [TAIL, 1 - TAIL]),
                      weighted_quantiles(exact, weights, [TAIL, 1 - TAIL]), strict=True)
    span = max(highs) - min(lows)
    h = bandwidth(exact, weights)
    if not h > 0:  # one sample carries all the weight: a kernel one grid step wide
        h = span / GRID_POINTS if span > 0 else 1.0
    edges = np.linspace(min(lows) - 4 * h, max(highs) + 4 * h, GRID_POINTS + 1)
    step = edges[1] - edges[0]
    half = min(int(np.ceil(4 * h / step)), GRID_POINTS)
    offsets = np.arange(-half, half + 1) * step / h
    kernel = np.exp(-0.5 * np.square(offsets))
    p, q = _density(network, None, edges, kernel), _density(exact, weights, edges, kernel)
    m = 0.5 * (p + q)
    return min(max(0.5 * _kl(p, m) + 0.5 * _kl(q, m), 0.0), LN2)  # within its bounds despite rounding


def _kl(p: np.ndarray, m: np.ndarray) -> float:
    where = p > 0
    return float(np.sum(p[where] * np.log(p[where] / m[where])))


def network_vs_exact(network: np.ndarray, exact: np.ndarray, weights: np.ndarray,
                     names: Sequence[str]) -> dict[str, float]:
    """{name: JSD in nat} of one event: network samples (S, P), exact samples (n, P) with weights (n,),
    all NaN when every weight is 0."""
    if not np.any(weights > 0):
        return {name: float("nan") for name in names}
    return {name: marginal_jsd(network[:, i], exact[:, i], weights) for i, name in enumerate(names)}
