"""Priors, detector response, the strain simulator and the exact likelihood of the toy problem."""

import math

import pytest
import torch

from stagewise.data import StrainSimulator
from stagewise.detectors import Detectors
from stagewise.priors import Prior, make_priors, sample_priors
from stagewise.simulate.likelihood import log_likelihood
from stagewise.simulate.noise import fiducial_asd, frequency_grid
from stagewise.simulate.ringdown import ringdown_polarisations

DETECTORS = {
    "H1": {"antenna_plus": 0.6, "antenna_cross": 0.4, "time_offset": 0.0},
    "L1": {"antenna_plus": -0.5, "antenna_cross": 0.5, "time_offset": 0.007},
}
EXTRINSIC_PRIOR = {
    "snr": {"distribution": "uniform", "low": 10.0, "high": 40.0},
    "phase": {"distribution": "uniform", "low": 0.0, "high": 2 * math.pi},
    "time": {"distribution": "fixed", "value": 0.0},
}
PRIORS = {
    "uniform": {"distribution": "uniform", "low": 50.0, "high": 250.0},
    "loguniform": {"distribution": "loguniform", "low": 0.01, "high": 0.1},
    "fixed": {"distribution": "fixed", "value": 0.3},
}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def small_simulator():
    """The toy problem on a coarse grid: 2 detectors, F = 62 bins from 20 to 508 Hz."""
    frequencies = frequency_grid(20.0, 512.0, 8.0)
    asd = torch.stack([fiducial_asd(frequencies, level) for level in (1.0, 1.2)])
    return StrainSimulator(frequencies, Detectors(DETECTORS), make_priors(EXTRINSIC_PRIOR), asd, None,
                           num_asd_bands=4, device="cpu")


def polarisations(num_events, seed=1, dtype=torch.complex64):
    """Ringdown polarisations (B, F) and their labels for f0 in [80, 200] Hz, tau in [0.01, 0.05] s."""
    g = generator(seed)
    f0 = 80.0 + 120.0 * torch.rand(num_events, generator=g, dtype=torch.float64)
    tau = 0.01 + 0.04 * torch.rand(num_events, generator=g, dtype=torch.float64)
    h_plus, h_cross = ringdown_polarisations(f0, tau, frequency_grid(20.0, 512.0, 8.0))
    return h_plus.to(dtype), h_cross.to(dtype), {"f0": f0, "tau": tau}


# priors


@pytest.mark.parametrize("name", ["uniform", "loguniform", "fixed"])
def test_prior_samples_lie_within_the_bounds(name):
    prior = Prior(name, PRIORS[name])

    x = prior.sample(10_000, generator())

    assert x.dtype == torch.float64
    assert bool(((x >= prior.low) & (x <= prior.high)).all())


@pytest.mark.parametrize("name", ["uniform", "loguniform", "fixed"])
def test_prior_samples_are_reproducible_with_the_same_seed(name):
    prior = Prior(name, PRIORS[name])

    first, second = prior.sample(1000, generator(7)), prior.sample(1000, generator(7))

    assert torch.equal(first, second)


def test_sample_priors_draws_differently_with_another_seed():
    priors = make_priors(PRIORS)

    first, second = sample_priors(priors, 100, generator(7)), sample_priors(priors, 100, generator(8))

    assert not torch.equal(first["uniform"], second["uniform"])
    assert not torch.equal(first["loguniform"], second["loguniform"])


@pytest.mark.parametrize("name", ["uniform", "loguniform", "fixed"])
def test_prior_log_prob_is_minus_infinity_outside_the_support(name):
    prior = Prior(name, PRIORS[name])
    outside = torch.tensor([prior.low * 0.5, prior.high * 2.0, -1.0], dtype=torch.float64)

    assert bool((prior.log_prob(outside) == -math.inf).all())
    assert bool(torch.isfinite(prior.log_prob(torch.tensor([prior.low, prior.high], dtype=torch.float64))).all())


@pytest.mark.parametrize("name", ["uniform", "loguniform"])
def test_prior_density_integrates_to_one(name):
    prior = Prior(name, PRIORS[name])
    x = torch.linspace(prior.low, prior.high, 200_001, dtype=torch.float64)

    integral = torch.trapezoid(prior.log_prob(x).exp(), x)

    assert integral.item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("name", ["uniform", "loguniform", "fixed"])
def test_prior_std_matches_the_std_of_200k_samples(name):
    prior = Prior(name, PRIORS[name])

    sample_std = prior.sample(200_000, generator(3)).std().item()

    assert prior.std() == pytest.approx(sample_std, rel=0.02, abs=1e-12)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"distribution": "uniform", "low": 2.0, "high": 1.0}, "low"),
        ({"distribution": "loguniform", "low": 0.0, "high": 1.0}, "loguniform needs low > 0"),
    ],
)
def test_prior_rejects_invalid_bounds(spec, message):
    with pytest.raises(ValueError, match=message):
        Prior("tau", spec)


# detectors


def test_project_at_phase_and_time_zero_is_the_antenna_weighted_sum():
    detectors = Detectors({name: dict(spec, time_offset=0.0) for name, spec in DETECTORS.items()})
    h_plus, h_cross, _ = polarisations(3, dtype=torch.complex128)
    zero = torch.zeros(3, dtype=torch.float64)

    strain = detectors.project(h_plus, h_cross, zero, zero, frequency_grid(20.0, 512.0, 8.0))

    for d, spec in enumerate(DETECTORS.values()):
        expected = spec["antenna_plus"] * h_plus + spec["antenna_cross"] * h_cross
        torch.testing.assert_close(strain[:, d], expected, rtol=1e-12, atol=0.0)


def test_project_with_phase_gives_the_transform_of_the_phase_shifted_ringdown():
    detectors = Detectors({name: dict(spec, time_offset=0.0) for name, spec in DETECTORS.items()})
    frequencies = frequency_grid(20.0, 512.0, 8.0)
    f0, tau, phase = (torch.tensor([value], dtype=torch.float64) for value in (120.0, 0.02, 0.8))
    h_plus, h_cross = ringdown_polarisations(f0, tau, frequencies)

    strain = detectors.project(h_plus, h_cross, phase, torch.zeros(1, dtype=torch.float64), frequencies)

    # exp(-t / tau) cos(2 pi f0 t + phase) and sin(...), Fourier transformed by hand
    below = torch.exp(1j * phase) / (1 / tau + 2j * math.pi * (frequencies - f0))
    above = torch.exp(-1j * phase) / (1 / tau + 2j * math.pi * (frequencies + f0))
    plus, cross = 0.5 * (below + above), (below - above) / 2j
    for d, spec in enumerate(DETECTORS.values()):
        expected = spec["antenna_plus"] * plus + spec["antenna_cross"] * cross
        torch.testing.assert_close(strain[0, d], expected, rtol=1e-10, atol=0.0)


def test_project_delays_each_detector_by_its_time_offset():
    detectors = Detectors(DETECTORS)
    frequencies = frequency_grid(20.0, 512.0, 8.0)
    h_plus, h_cross, _ = polarisations(3, dtype=torch.complex128)
    zero = torch.zeros(3, dtype=torch.float64)

    strain = detectors.project(h_plus, h_cross, zero, zero, frequencies)

    for d, spec in enumerate(DETECTORS.values()):
        expected = ((spec["antenna_plus"] * h_plus + spec["antenna_cross"] * h_cross)
                    * torch.exp(-2j * math.pi * spec["time_offset"] * frequencies))
        torch.testing.assert_close(strain[:, d], expected, rtol=1e-12, atol=1e-15)


def test_project_with_time_shift_multiplies_by_the_fourier_phase_factor():
    detectors = Detectors(DETECTORS)
    frequencies = frequency_grid(20.0, 512.0, 8.0)
    h_plus, h_cross, _ = polarisations(3, dtype=torch.complex128)
    phase = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    time = torch.tensor([0.003, -0.01, 0.02], dtype=torch.float64)

    shifted = detectors.project(h_plus, h_cross, phase, time, frequencies)

    unshifted = detectors.project(h_plus, h_cross, phase, torch.zeros(3, dtype=torch.float64), frequencies)
    factor = torch.exp(-2j * math.pi * time[:, None, None] * frequencies)
    torch.testing.assert_close(shifted, unshifted * factor, rtol=1e-10, atol=1e-14)


# simulator


def test_simulator_signals_have_exactly_the_drawn_snr_with_the_fiducial_asd():
    simulator = small_simulator()
    h_plus, h_cross, _ = polarisations(64)
    extrinsic = sample_priors(simulator.extrinsic_priors, 64, generator())

    whitened = simulator.whitened_signals(h_plus, h_cross, extrinsic)

    snr = torch.sqrt(whitened.abs().square().sum(dim=(1, 2))).to(torch.float64)
    torch.testing.assert_close(snr, extrinsic["snr"], rtol=1e-5, atol=0.0)


def test_whitened_signals_equal_the_projected_strain_scaled_and_divided_by_each_asd():
    """The simulator's short route (response at time 0, SNR, then one factor for time shift, SNR
    scale and ASD ratio) against the definition, in complex128: project, scale to the SNR
    with the fiducial ASD, divide by the sample's ASD."""
    simulator = small_simulator()
    h_plus, h_cross, _ = polarisations(64)
    extrinsic = sample_priors(simulator.extrinsic_priors, 64, generator(3))
    asds = simulator.fiducial_asd * (1.0 + torch.rand(64, *simulator.fiducial_asd.shape, generator=generator(4)))

    whitened = simulator.whitened_signals(h_plus, h_cross, extrinsic, asds)

    strain = simulator.detectors.project(h_plus.to(torch.complex128), h_cross.to(torch.complex128),
                                         extrinsic["phase"], extrinsic["time"], simulator.frequencies)
    fiducial = simulator.fiducial_asd.to(torch.float64)
    snr = torch.sqrt((strain.abs() / fiducial).square().sum(dim=(1, 2)))
    expected = strain * (extrinsic["snr"] / snr)[:, None, None] / asds.to(torch.float64)
    scale = expected.abs().max()
    torch.testing.assert_close(whitened.to(torch.complex128) / scale, expected / scale, rtol=0.0, atol=1e-5)


def test_simulator_adds_standard_normal_noise_to_the_whitened_signal():
    simulator = small_simulator()
    h_plus, h_cross, labels = polarisations(256)

    parameters, inputs, features = simulator(h_plus, h_cross, labels, generator(5))

    extrinsic = sample_priors(simulator.extrinsic_priors, 256, generator(5))  # the same first draws
    whitened = simulator.whitened_signals(h_plus, h_cross, extrinsic)
    noise = inputs - torch.stack((whitened.real, whitened.imag), dim=2)
    assert inputs.shape == (256, 2, 2, 62)
    assert torch.equal(parameters["snr"], extrinsic["snr"])
    assert torch.equal(parameters["f0"], labels["f0"])
    assert abs(noise.mean().item()) < 0.02
    assert noise.std().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(features, torch.zeros(256, 8))


# likelihood


def truth():
    return {
        "f0": torch.tensor([120.0], dtype=torch.float64),
        "tau": torch.tensor([0.02], dtype=torch.float64),
        "snr": torch.tensor([20.0], dtype=torch.float64),
        "phase": torch.tensor([1.0], dtype=torch.float64),
        "time": torch.tensor([0.0], dtype=torch.float64),
    }


def whitened_data(simulator, parameters, noise_generator):
    """Noise-free whitened signal (D, F) plus complex noise with standard-normal real and imaginary parts."""
    h_plus, h_cross = ringdown_polarisations(parameters["f0"], parameters["tau"], simulator.frequencies)
    signal = simulator.whitened_signals(h_plus, h_cross, parameters)[0]
    shape = signal.shape
    noise = torch.complex(torch.randn(shape, generator=noise_generator, dtype=torch.float64),
                          torch.randn(shape, generator=noise_generator, dtype=torch.float64))
    return signal + noise


def test_minus_twice_log_likelihood_at_the_truth_is_chi_square_with_2DF_degrees_of_freedom_plus_its_norm():
    simulator = small_simulator()
    parameters, noise_generator, num_draws = truth(), generator(11), 400

    dof = 2 * simulator.fiducial_asd.numel()
    values = torch.cat([
        -2 * log_likelihood(whitened_data(simulator, parameters, noise_generator), parameters, simulator,
                            simulator.fiducial_asd) - dof * math.log(2 * math.pi)
        for _ in range(num_draws)
    ])

    assert abs(values.mean().item() - dof) < 4 * math.sqrt(2 * dof / num_draws)
    assert values.var().item() == pytest.approx(2 * dof, rel=0.25)


def test_log_likelihood_is_larger_at_the_truth_than_far_away():
    simulator = small_simulator()
    parameters = truth()
    data = whitened_data(simulator, parameters, generator(12))
    far = dict(parameters, f0=torch.tensor([200.0], dtype=torch.float64),
               tau=torch.tensor([0.05], dtype=torch.float64))
    points = {name: torch.cat([parameters[name], far[name]]) for name in parameters}

    at_truth, far_away = log_likelihood(data, points, simulator, simulator.fiducial_asd)

    assert at_truth > far_away
