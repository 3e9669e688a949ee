"""P-P calibration and the Gaussian summaries (evaluate/calibration.py) against known answers.

The statistical cases use a conjugate Gaussian model, whose posterior is known exactly:
each parameter has a Gaussian prior, each injection NUM_DATA measurements with Gaussian
noise (a noise level of its own, so that every injection has its own posterior width), and
the truth is a draw from the prior. Samples from that posterior are an exact posterior;
shifting them or shrinking their spread makes a miscalibrated one.

Tolerances follow from the sample sizes: each statistical assertion fails for a given
seed with probability below ALPHA (the generators are seeded, so the outcome is fixed;
another seed would fail at most once in 1/ALPHA). For an empirical CDF of N levels the
Dvoretzky-Kiefer-Wolfowitz bound gives sup |F_N - F| <= dkw(N) except with probability
ALPHA; the same width bounds the mean of N values in [0, 1] (Hoeffding); the mean and standard
deviation of N Gaussian pulls get Z standard errors, a coverage its binomial 1 - ALPHA interval.
"""

import math

import numpy as np
import pytest
from scipy import stats

from stagewise.evaluate.calibration import combined_pvalue, credible_levels, gaussian_summary, ks_pvalues, pp_curve

ALPHA = 1e-6  # probability that one statistical assertion fails for a given seed although the code is right
Z = stats.norm.isf(ALPHA / 2)  # two-sided: 4.9 standard errors
NAMES = ["a", "b"]
PRIOR_MEAN, PRIOR_STD = np.array([3.0, -1.0]), np.array([2.0, 0.5])
NOISE_STD = np.array([1.5, 0.2])
NUM_DATA = 4
NUM_INJECTIONS, NUM_SAMPLES = 2000, 1000  # the P-P cases
GRID = np.linspace(0.0, 1.0, 201)


def dkw(n, alpha=ALPHA):
    """Half-width of the DKW band (and of Hoeffding's interval for a mean of values in [0, 1])."""
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def conjugate_posteriors(seed, num_injections):
    """(truths, posterior means, posterior stds), each (N, P)."""
    rng = np.random.default_rng(seed)
    truths = rng.normal(PRIOR_MEAN, PRIOR_STD, size=(num_injections, 2))
    noise = NOISE_STD * rng.uniform(0.5, 2.0, size=(num_injections, 2))
    data = truths[:, None, :] + noise[:, None, :] * rng.standard_normal((num_injections, NUM_DATA, 2))
    precision = 1 / PRIOR_STD**2 + NUM_DATA / noise**2
    mean = (PRIOR_MEAN / PRIOR_STD**2 + data.sum(axis=1) / noise**2) / precision
    return truths, mean, precision**-0.5


def posterior_samples(rng, mean, std, shift=0.0, scale=1.0, num_samples=NUM_SAMPLES):
    """(N, S, P) draws from N(mean + shift std, (scale std)^2): shift 0, scale 1 is the exact posterior."""
    z = rng.standard_normal((mean.shape[0], num_samples, mean.shape[1]))
    return (mean + shift * std)[:, None, :] + scale * std[:, None, :] * z


def exact_level_cdf(grid, num_samples):
    """P(level <= u) for an exact posterior: the truth's rank among its S samples is uniform on 0..S."""
    return (np.floor(grid * num_samples) + 1) / (num_samples + 1)


# --- credible_levels, pp_curve and ks_pvalues: hand-computed cases ---

# two injections, four samples, two parameters
HAND_SAMPLES = np.array([
    [[0.3, 5.0], [0.1, 7.0], [0.4, 6.0], [0.2, 8.0]],
    [[1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [4.0, -4.0]],
])
HAND_TRUTHS = np.array([[0.25, 6.5], [3.5, -10.0]])
HAND_WEIGHTS = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.0, 0.5]])


def test_credible_level_is_the_fraction_of_samples_below_the_truth():
    # a: 0.1 and 0.2 of four lie below 0.25; 1, 2, 3 below 3.5. b: 5 and 6 below 6.5; none below -10
    assert credible_levels(HAND_SAMPLES, HAND_TRUTHS) == pytest.approx(np.array([[0.5, 0.5], [0.75, 0.0]]))


def test_weighted_credible_level_is_the_weight_of_the_samples_below_the_truth():
    # a: weights of 0.1 and 0.2 (0.2 + 0.4); of 1, 2, 3 (0.5 + 0 + 0). b: of 5 and 6 (0.1 + 0.3); none
    levels = credible_levels(HAND_SAMPLES, HAND_TRUTHS, HAND_WEIGHTS)
    assert levels == pytest.approx(np.array([[0.6, 0.4], [0.5, 0.0]]))
    equal = np.full(HAND_WEIGHTS.shape, 1 / HAND_WEIGHTS.shape[1])
    assert credible_levels(HAND_SAMPLES, HAND_TRUTHS, equal) == pytest.approx(credible_levels(HAND_SAMPLES,
                                                                                              HAND_TRUTHS))


def test_pp_curve_is_the_fraction_of_levels_at_or_below_each_grid_point_per_parameter():
    levels = np.array([[0.1, 0.9], [0.4, 0.2], [0.7, 0.5], [0.5, 0.6]])
    grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    expected = np.array([[0, 0], [1 / 4, 1 / 4], [3 / 4, 2 / 4], [1, 3 / 4], [1, 1]])
    assert pp_curve(levels, grid) == pytest.approx(expected)


def test_ks_pvalue_of_one_level_is_twice_its_distance_from_the_far_end():
    # one value x: D = max(x, 1 - x) and P(D >= d) = 2 (1 - d) for d >= 1/2
    assert ks_pvalues(np.array([[0.8, 0.3]]), ["a", "b"]) == pytest.approx({"a": 0.4, "b": 0.6})


# --- combined_pvalue: Fisher's method by hand ---

def fisher_by_hand(pvalues):
    """-2 sum log p follows chi2 with 2k degrees of freedom, whose survival function at 2t is
    exp(-t) sum_{i<k} t^i / i!, here with t = -log(prod p): prod p * sum_{i<k} t^i / i!."""
    product = math.prod(pvalues)
    t = -math.log(product)
    return product * sum(t**i / math.factorial(i) for i in range(len(pvalues)))


@pytest.mark.parametrize("pvalues, expected", [
    ([0.3], 0.3),  # one p-value is its own combination
    ([0.05, 0.5], 0.025 * (1 + math.log(40))),  # 0.11722
    ([0.1, 0.2, 0.3], 0.006 * (1 + math.log(1 / 0.006) + math.log(1 / 0.006) ** 2 / 2)),  # 0.11522
    ([0.9, 0.01, 0.5, 0.04], None),
])
def test_combined_pvalue_is_fishers_chi2_with_two_degrees_of_freedom_per_pvalue(pvalues, expected):
    combined = combined_pvalue({f"p{i}": p for i, p in enumerate(pvalues)})
    assert combined == pytest.approx(fisher_by_hand(pvalues), rel=1e-12)
    if expected is not None:
        assert combined == pytest.approx(expected, rel=1e-12)


# --- P-P of exact and miscalibrated posteriors ---

@pytest.fixture(scope="module")
def pp_case():
    return conjugate_posteriors(seed=11, num_injections=NUM_INJECTIONS)


def test_exact_posterior_gives_uniform_credible_levels_and_ks_pvalues_that_are_not_small(pp_case):
    truths, mean, std = pp_case
    rng = np.random.default_rng(12)
    levels = credible_levels(posterior_samples(rng, mean, std), truths)
    curve = pp_curve(levels, GRID)
    deviation = np.abs(curve - exact_level_cdf(GRID, NUM_SAMPLES)[:, None]).max(axis=0)
    assert (deviation <= dkw(NUM_INJECTIONS)).all(), deviation
    assert np.abs(curve - GRID[:, None]).max() <= dkw(NUM_INJECTIONS) + 1 / (NUM_SAMPLES + 1)
    pvalues = ks_pvalues(levels, NAMES)
    assert list(pvalues) == NAMES
    # uniform under an exact posterior: below ALPHA once in 1/ALPHA seeds
    assert min(pvalues.values()) > ALPHA and combined_pvalue(pvalues) > ALPHA, pvalues


@pytest.mark.parametrize("shift, scale, what", [
    (0.5, 1.0, "shifted by half a posterior width"),
    (0.0, 0.5, "over-confident: half the posterior width"),
    (0.0, 2.0, "under-confident: twice the posterior width"),
])
def test_miscalibrated_posterior_gives_a_small_ks_pvalue_for_its_parameter_only(pp_case, shift, scale, what):
    """Parameter b's samples are miscalibrated, a's exact. Without the finite S, the level of a truth
    is Phi((z - shift) / scale) for z ~ N(0, 1), so P(level <= u) = Phi(shift + scale Phi^-1(u)): its
    largest distance from the diagonal is at least 0.15 here, so the KS distance of N levels is at least
    0.15 - dkw(N) - 1/S, and the p-value below the README's threshold of miscalibration, 0.01."""
    truths, mean, std = pp_case
    rng = np.random.default_rng(13)
    samples = posterior_samples(rng, mean, std)
    samples[:, :, 1] = posterior_samples(rng, mean, std, shift, scale)[:, :, 1]
    interior = GRID[1:-1]
    distance = np.abs(stats.norm.cdf(shift + scale * stats.norm.ppf(interior)) - interior).max()
    assert distance > 0.15
    levels = credible_levels(samples, truths)
    pvalues = ks_pvalues(levels, NAMES)
    assert pvalues["a"] > ALPHA, what
    assert pvalues["b"] < 0.01 and combined_pvalue(pvalues) < 0.01, (what, pvalues)
    # the mean level is P(scale Z' + shift < z) = Phi(-shift / sqrt(1 + scale^2)), exactly also for finite S
    expected_mean = stats.norm.cdf(-shift / math.sqrt(1 + scale**2))
    assert abs(levels[:, 1].mean() - expected_mean) <= dkw(NUM_INJECTIONS), what


def test_importance_weights_to_the_exact_posterior_make_a_wide_shifted_proposal_calibrated(pp_case):
    """Samples from a proposal twice as wide and shifted by half a width fail P-P; weighted by
    posterior / proposal (normalised per injection) their levels are uniform again."""
    truths, mean, std = pp_case
    rng = np.random.default_rng(14)
    shift, scale = 0.5, 2.0
    samples = posterior_samples(rng, mean, std, shift, scale)
    log_posterior = stats.norm.logpdf(samples, mean[:, None, :], std[:, None, :]).sum(axis=2)
    log_proposal = stats.norm.logpdf(samples, (mean + shift * std)[:, None, :], scale * std[:, None, :]).sum(axis=2)
    log_w = log_posterior - log_proposal
    weights = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    assert max(ks_pvalues(credible_levels(samples, truths), NAMES).values()) < 0.01
    reweighted = ks_pvalues(credible_levels(samples, truths, weights), NAMES)
    assert min(reweighted.values()) > ALPHA, reweighted


# --- gaussian_summary ---

def test_gaussian_summary_by_hand():
    truth_network = np.zeros((4, 2))
    mean_network = np.array([[0.5, -1.0], [-0.5, 3.0], [1.5, 0.1], [0.0, -0.2]])
    sigma_network = np.array([[1.0, 2.0], [0.25, 2.0], [1.0, 0.5], [1.0, 1.0]])
    # pulls: a 0.5, -2, 1.5, 0; b -0.5, 1.5, 0.2, -0.2
    truth = np.array([[10.0, 1.0], [20.0, 2.0], [30.0, 3.0], [40.0, 4.0]])
    mean = np.array([[11.0, 1.5], [19.0, 2.5], [33.0, 3.0], [40.0, 2.0]])
    # residuals: a 1, -1, 3, 0; b 0.5, 0.5, 0, -2 (standard deviations over the injections, ddof 0)
    summary = gaussian_summary(["a", "b"], truth_network, mean_network, sigma_network, truth, mean)
    assert list(summary) == ["a", "b"]
    assert summary["a"] == pytest.approx({
        "residual_mean": 0.75, "residual_std": math.sqrt(8.75 / 4), "pull_mean": 0.0, "pull_std": math.sqrt(6.5 / 4),
        "coverage_68": 2 / 4, "coverage_95": 3 / 4})
    assert summary["b"] == pytest.approx({
        "residual_mean": -0.25, "residual_std": math.sqrt(4.25 / 4), "pull_mean": 0.25,
        "pull_std": math.sqrt(2.33 / 4), "coverage_68": 3 / 4, "coverage_95": 4 / 4})


NUM_PULLS = 20000
K68, K95 = 1.0, 1.959964  # the half-widths of the 68 % and 95 % intervals in units of σ


def known_summary(shift, scale):
    """Pull moments and coverage of predictions whose mean is off by `shift` true widths and whose σ is
    `scale` times the true width: the pulls are (z + shift) / scale with z ~ N(0, 1)."""
    def coverage(k):
        return stats.norm.cdf(k * scale - shift) - stats.norm.cdf(-k * scale - shift)
    return {"pull_mean": shift / scale, "pull_std": 1 / scale, "coverage_68": coverage(K68),
            "coverage_95": coverage(K95)}


@pytest.mark.parametrize("shift, scale, what", [
    (0.0, 1.0, "calibrated"),  # pull std 1, coverage 0.683 and 0.950
    (0.0, 0.5, "over-confident: half the width"),  # pull std 2, coverage 0.383 and 0.673
    (0.0, 2.0, "under-confident: twice the width"),  # pull std 0.5, coverage 0.954 and 1.000
    (0.5, 1.0, "biased by half a width"),  # pull mean 0.5, coverage 0.625 and 0.921
])
def test_gaussian_summary_of_gaussian_predictions_gives_their_pull_moments_and_coverage(shift, scale, what):
    """Label a is predicted by the exact posterior's mean and std; label b by mean + shift std with
    σ = scale std. Tolerances: Z standard errors of a mean (σ/√N) and of a standard deviation
    (σ/√(2N)), and the binomial 1 - ALPHA interval of the count inside each interval."""
    truths, mean, std = conjugate_posteriors(seed=23, num_injections=NUM_PULLS)
    predicted, sigma = mean.copy(), std.copy()
    predicted[:, 1] += shift * std[:, 1]
    sigma[:, 1] *= scale
    summary = gaussian_summary(NAMES, truths, predicted, sigma, np.exp(truths), np.exp(predicted))
    for name, known in (("a", known_summary(0.0, 1.0)), ("b", known_summary(shift, scale))):
        width = known["pull_std"]
        assert abs(summary[name]["pull_mean"] - known["pull_mean"]) <= Z * width / math.sqrt(NUM_PULLS), (what, name)
        assert abs(summary[name]["pull_std"] - width) <= Z * width / math.sqrt(2 * NUM_PULLS), (what, name)
        for key in ("coverage_68", "coverage_95"):
            low, high = stats.binom.interval(1 - ALPHA, NUM_PULLS, known[key])
            assert low <= summary[name][key] * NUM_PULLS <= high, (what, name, key, summary[name][key], known[key])
