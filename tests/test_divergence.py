"""The network-vs-exact measure (Jensen-Shannon divergence of marginals) on cases with a known answer,
and importance sampling in batches until an effective number of samples."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, stats

from stagewise.evaluate.divergence import marginal_jsd, network_vs_exact
from stagewise.evaluate.importance import Exact, SampleBudget, effective_samples, weigh_until
from stagewise.evaluate.run import network_vs_exact_report


def gaussian_jsd(shift: float) -> float:
    """The JSD in nat of N(0, 1) and N(shift, 1), by quadrature."""
    p, q = stats.norm(0, 1), stats.norm(shift, 1)

    def integrand(x):
        m = 0.5 * (p.pdf(x) + q.pdf(x))
        return 0.5 * p.pdf(x) * math.log(p.pdf(x) / m) + 0.5 * q.pdf(x) * math.log(q.pdf(x) / m)

    return integrate.quad(integrand, -12, 12 + shift, limit=200)[0]


def weighted_standard_normal(rng, n):
    """Samples of a wider proposal N(0.3, 1.5^2) with the weights that make them N(0, 1)."""
    x = 0.3 + 1.5 * rng.standard_normal(n)
    log_w = stats.norm.logpdf(x) - stats.norm.logpdf(x, 0.3, 1.5)
    w = np.exp(log_w - log_w.max())
    return x, w / w.sum()


def test_an_exact_network_gives_a_divergence_near_zero():
    """The network's samples are drawn from the posterior that the weighted samples represent."""
    rng = np.random.default_rng(1)
    values = []
    for _ in range(10):
        exact, weights = weighted_standard_normal(rng, 4000)
        values.append(marginal_jsd(rng.standard_normal(2000), exact, weights))
    assert np.median(values) < 0.003
    assert max(values) < 0.01


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0])
def test_a_shifted_network_gives_the_divergence_of_the_shift(shift):
    """N(shift, 1) against weighted samples of N(0, 1): the estimate is the exact JSD within its noise and
    smoothing (a few per cent of it, plus the noise floor)."""
    rng = np.random.default_rng(2)
    exact, weights = weighted_standard_normal(rng, 20000)
    estimate = marginal_jsd(shift + rng.standard_normal(20000), exact, weights)
    assert estimate == pytest.approx(gaussian_jsd(shift), rel=0.1, abs=0.002)
    assert estimate > 0.02


def test_disjoint_posteriors_give_ln2_and_no_weight_gives_nan():
    rng = np.random.default_rng(3)
    network = np.stack([rng.standard_normal(500), 100 + rng.standard_normal(500)], axis=1)
    exact = rng.standard_normal((500, 2))
    result = network_vs_exact(network, exact, np.full(500, 1 / 500), ["same", "far"])
    assert result["far"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["same"] < 0.02
    assert all(math.isnan(v) for v in network_vs_exact(network, exact, np.zeros(500), ["a", "b"]).values())


def batches_of(log_weights):
    """Batches whose 'samples' are their index, with given log weights."""
    for k, log_w in enumerate(log_weights):
        yield k, torch.as_tensor(log_w, dtype=torch.float64)


def test_batches_are_drawn_until_the_effective_number_is_reached():
    equal = [np.zeros(100)] * 10  # every batch adds 100 effective samples
    drawn, log_w = weigh_until(batches_of(equal), lambda batch: batch[1], SampleBudget(100, 250, 1000))
    assert [k for k, _ in drawn] == [0, 1, 2]  # 300 >= 250 after the third
    assert len(log_w) == 300 and effective_samples(log_w) == pytest.approx(300)


def test_the_cap_stops_the_batches_and_no_target_draws_one():
    poor = [np.r_[0.0, np.full(99, -50.0)]] * 10  # one sample carries each batch
    drawn, log_w = weigh_until(batches_of(poor), lambda batch: batch[1], SampleBudget(100, 500, 450))
    assert len(drawn) == 4 and len(log_w) == 400  # 450 // 100 batches
    assert effective_samples(log_w) == pytest.approx(4, rel=1e-6)
    drawn, _ = weigh_until(batches_of(poor), lambda batch: batch[1], SampleBudget(100, None, 1000))
    assert len(drawn) == 1
    assert effective_samples(torch.full((5,), -math.inf)) == 0.0


def test_the_pooled_efficiency_is_not_that_of_a_lucky_first_batch():
    """Heavy-tailed weights: the first batch alone misses the rare large weights and overestimates the
    efficiency; pooling every batch drawn gives the efficiency of all of them."""
    rng = np.random.default_rng(4)
    log_weights = [rng.standard_normal(200) * 2.5 for _ in range(20)]
    drawn, log_w = weigh_until(batches_of(log_weights), lambda batch: batch[1], SampleBudget(200, 10**6, 4000))
    pooled = effective_samples(log_w) / len(log_w)
    first = effective_samples(torch.as_tensor(log_weights[0])) / 200
    everything = effective_samples(torch.as_tensor(np.concatenate(log_weights))) / 4000
    assert len(drawn) == 20 and pooled == pytest.approx(everything)
    assert first > pooled


def test_a_single_weighted_sample_gives_a_finite_divergence():
    rng = np.random.default_rng(5)
    weights = np.zeros(100)
    weights[7] = 1.0
    value = marginal_jsd(rng.standard_normal(500), rng.standard_normal(100), weights)
    assert 0 < value <= math.log(2)
    assert 0 <= marginal_jsd(np.zeros(10), np.zeros(10), np.ones(10)) < 1e-12  # no spread at all


def test_the_report_counts_injections_with_enough_effective_samples_and_plots_the_worst(tmp_path):
    """Four injections: two exact networks, one shifted by 2 sigma in b, one with too few effective samples
    (left out although it is the most shifted); the medians and the worst injection follow."""
    rng = np.random.default_rng(6)
    names = ["a", "b"]
    network, exact, rows = [], [], []
    for i, (shift, n_eff) in enumerate([(0.0, 800), (0.0, 800), (2.0, 800), (5.0, 10)]):
        network.append(rng.standard_normal((1000, 2)) + [0.0, shift])
        exact.append(Exact(rng.standard_normal((800, 2)), np.full(800, 1 / 800)))
        rows.append({"injection": i, "efficiency": n_eff / 800, "n_eff": n_eff, "num_samples": 800})
    table, section = network_vs_exact_report(np.stack(network), exact, pd.DataFrame(rows), SampleBudget(800, 300, 800),
                                             np.zeros((4, 2)), names, tmp_path)
    assert section["injections_used"] == 3 and section["injections_left_out"] == 1
    assert section["a"]["jsd_median"] < 0.01 and section["b"]["jsd_median"] < 0.01  # two of three exact
    assert section["b"]["jsd_q90"] > 0.15  # the shifted one (0.26 nat alone)
    assert table["jsd_b"].iloc[3] > table["jsd_b"].iloc[2]  # computed for the left-out one too
    assert (tmp_path / "network_vs_exact.png").stat().st_size > 1000
    assert (tmp_path / "network_vs_exact_worst.png").stat().st_size > 1000
