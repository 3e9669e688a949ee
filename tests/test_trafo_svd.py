"""The transformation model (label and input standardisation) and the SVD basis of whitened signals."""

import itertools
import math

import numpy as np
import pytest
import torch

from stagewise.config import Problem, simulation_settings
from stagewise.events import SIGNAL_DATASETS, EventFileError, read_events
from stagewise.simulate.files import simulate
from stagewise.sources import make_simulator
from stagewise.svd import fit_basis, mismatch_table, whitened_signal_vectors
from stagewise.trafo import Trafo, fit_trafo, signal_batches

CONFIG = {  # modelled on config/config.yaml, with a coarse grid and small files
    "data": {"kind": "signals", "simulate": True},
    "seed": 42,
    "simulation": {
        "frequencies": {"f_min": 20.0, "f_max": 512.0, "delta_f": 8.0},
        "events_per_file": 200,
        "num_files": {"training": 2, "validation": 1, "test": 1},
        "asd": {"levels": [1.0, 1.2], "num_asds": 4, "level_scatter": 0.1, "shape_scatter": 0.15},
    },
    "intrinsic_prior": {
        "f0": {"distribution": "uniform", "low": 50.0, "high": 250.0},
        "tau": {"distribution": "loguniform", "low": 0.01, "high": 0.1},
    },
    "extrinsic_prior": {
        "snr": {"distribution": "uniform", "low": 10.0, "high": 40.0},
        "phase": {"distribution": "uniform", "low": 0.0, "high": 2 * math.pi},
        "time": {"distribution": "fixed", "value": 0.0},
    },
    "inference_parameters": ["f0", "tau", "snr"],
    "detectors": {
        "H1": {"antenna_plus": 0.6, "antenna_cross": 0.4, "time_offset": 0.0},
        "L1": {"antenna_plus": -0.5, "antenna_cross": 0.5, "time_offset": 0.007},
    },
}
NUM_BINS = 62  # frequency_grid(20, 512, 8)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Two event files of 200 events each and the fiducial ASD file, simulated once for this module."""
    folder = tmp_path_factory.mktemp("data")
    paths = [folder / f"training_{i}.h5" for i in range(2)]
    simulate(simulation_settings(CONFIG), paths, folder / "fiducial_asd.h5", folder / "asd_set.h5")
    simulator = make_simulator(Problem.from_settings(CONFIG), paths[0], folder / "fiducial_asd.h5")
    return paths, simulator


def example_trafo():
    """Labels (f0, tau, snr) with tau standardised in log; inputs of shape (2, 2, 3)."""
    return Trafo(
        ["f0", "tau", "snr"],
        label_mean=[150.0, math.log(0.03), 25.0], label_std=[60.0, 0.7, 9.0], log_labels=[False, True, False],
        input_mean=torch.linspace(-1.0, 1.0, 12).reshape(2, 2, 3),
        input_std=torch.linspace(0.5, 2.0, 12).reshape(2, 2, 3),
    )


# Trafo


def test_labels_to_network_and_back_recovers_the_labels():
    trafo = example_trafo()
    parameters = {"f0": torch.tensor([60.0, 240.0]), "tau": torch.tensor([0.011, 0.09]),
                  "snr": torch.tensor([12.0, 39.0])}

    z = trafo.labels_to_network(parameters)

    assert z.dtype == torch.float32 and z.shape == (2, 3)
    expected_tau = (math.log(0.011) - math.log(0.03)) / 0.7
    assert z[0, 1].item() == pytest.approx(expected_tau, rel=1e-6)
    back = trafo.labels_from_network(z)
    expected = torch.stack([parameters[n].to(torch.float64) for n in trafo.names], dim=-1)
    torch.testing.assert_close(back, expected, rtol=1e-6, atol=0.0)


def test_trafo_save_then_load_gives_the_same_transformation(tmp_path):
    trafo = example_trafo()

    trafo.save(tmp_path / "trafo.h5", {"trafo": {"log_labels": ["tau"]}})
    loaded = Trafo.load(tmp_path / "trafo.h5")

    assert loaded.names == trafo.names
    for key in ("label_mean", "label_std", "log_labels", "input_mean", "input_std"):
        assert torch.equal(getattr(loaded, key), getattr(trafo, key)), key


def test_trafo_load_rejects_a_file_that_is_not_a_trafo(tmp_path, simulated):
    paths, _ = simulated

    with pytest.raises(ValueError, match="must be .trafo/1."):
        Trafo.load(paths[0])


def test_log_abs_det_jacobian_matches_the_derivative_of_labels_to_network():
    trafo = example_trafo()
    z = torch.tensor([[-1.0, 0.5, 0.3], [1.2, -1.5, -0.8]], dtype=torch.float64)
    x = trafo.labels_from_network(z)

    # labels_to_network acts on each label separately, so its Jacobian is diagonal; its output is float32
    step = 1e-3 * x
    plus = {n: x[:, i] + step[:, i] for i, n in enumerate(trafo.names)}
    minus = {n: x[:, i] - step[:, i] for i, n in enumerate(trafo.names)}
    derivative = (trafo.labels_to_network(plus).double() - trafo.labels_to_network(minus).double()) / (2 * step)

    expected = torch.log(derivative.abs()).sum(-1)
    torch.testing.assert_close(trafo.log_abs_det_jacobian(z), expected, rtol=0.0, atol=1e-4)


def test_inputs_to_network_standardises_each_feature():
    trafo = example_trafo()
    inputs = trafo.input_mean + trafo.input_std * torch.ones(5, 2, 2, 3)

    torch.testing.assert_close(trafo.inputs_to_network(inputs), torch.ones(5, 2, 2, 3))


# fit_trafo


def fit_signal_trafo(paths, simulator, parameters, num_batches, batch_size, **options):
    """fit_trafo on signal batches of the labels f0 and tau, tau in log space."""
    batches = signal_batches(paths, ["f0", "tau"], simulator, num_batches, batch_size, seed=1)
    return fit_trafo(batches, parameters, ["tau"], **options)


def test_fit_trafo_label_statistics_match_numpy_on_the_labels_read(simulated):
    paths, simulator = simulated
    num_batches, batch_size = 3, 100  # 300 events: all of the first file and half of the second

    trafo = fit_signal_trafo(paths, simulator, ["f0", "tau", "snr"], num_batches, batch_size)

    labels, _ = read_events(paths, ["f0", "tau"], SIGNAL_DATASETS, limit=num_batches * batch_size)
    expected_mean = [labels["f0"].mean(), np.log(labels["tau"]).mean()]
    expected_std = [labels["f0"].std(), np.log(labels["tau"]).std()]
    np.testing.assert_allclose(trafo.label_mean[:2].numpy(), expected_mean, rtol=1e-10)
    np.testing.assert_allclose(trafo.label_std[:2].numpy(), expected_std, rtol=1e-10)
    assert trafo.log_labels.tolist() == [False, True, False]
    snr_prior_std = 30.0 / math.sqrt(12)  # U(10, 40)
    assert trafo.label_mean[2].item() == pytest.approx(25.0, abs=4 * snr_prior_std / math.sqrt(300))
    assert trafo.label_std[2].item() == pytest.approx(snr_prior_std, rel=0.15)
    assert trafo.input_mean.shape == trafo.input_std.shape == (2, 2, NUM_BINS)
    assert bool((trafo.input_std > 0.8).all())


def test_fit_trafo_without_standardize_inputs_keeps_inputs_unchanged(simulated):
    paths, simulator = simulated

    trafo = fit_signal_trafo(paths, simulator, ["f0", "tau", "snr"], 1, 50, standardize_inputs=False)

    assert torch.equal(trafo.input_mean, torch.zeros(2, 2, NUM_BINS, dtype=torch.float64))
    assert torch.equal(trafo.input_std, torch.ones(2, 2, NUM_BINS, dtype=torch.float64))


def test_fit_trafo_raises_when_the_files_hold_fewer_events_than_batches_times_batch_size(simulated):
    paths, simulator = simulated

    with pytest.raises(EventFileError) as error:
        fit_signal_trafo(paths, simulator, ["f0", "tau", "snr"], num_batches=5, batch_size=100)

    assert "hold 400 events" in str(error.value)
    assert "need 500" in str(error.value)


# SVD


@pytest.fixture(scope="module")
def signal_vectors(simulated):
    """Unit-norm whitened signal vectors (400, D, 2F) of the simulated events."""
    paths, simulator = simulated
    _, data = read_events(paths, ["f0"], SIGNAL_DATASETS)
    h_plus, h_cross = (torch.as_tensor(data[k]) for k in SIGNAL_DATASETS)
    unit_inputs = Trafo(["f0"], [0.0], [1.0], [False], torch.zeros(2, 2, NUM_BINS), torch.ones(2, 2, NUM_BINS))
    return whitened_signal_vectors(simulator, unit_inputs, h_plus, h_cross, torch.Generator().manual_seed(3))


def test_whitened_signal_vectors_have_unit_norm(signal_vectors):
    assert signal_vectors.shape == (400, 2, 2 * NUM_BINS)
    norms = torch.linalg.vector_norm(signal_vectors, dim=-1)
    torch.testing.assert_close(norms, torch.ones(400, 2, dtype=torch.float64))


def test_fit_basis_returns_orthonormal_columns(signal_vectors):
    basis, singular_values = fit_basis(signal_vectors[:300, 0], 20)

    assert basis.shape == (2 * NUM_BINS, 20)
    torch.testing.assert_close(basis.T @ basis, torch.eye(20, dtype=basis.dtype), rtol=0.0, atol=1e-10)
    assert bool((singular_values[:-1] >= singular_values[1:]).all())


def test_fit_basis_rejects_a_size_above_the_rank_bound(signal_vectors):
    with pytest.raises(ValueError, match="svd.size 51 exceeds"):
        fit_basis(signal_vectors[:50, 0], 51)


def test_mismatch_decreases_with_basis_size(signal_vectors):
    basis, _ = fit_basis(signal_vectors[:300, 0], 64)

    table = mismatch_table(basis, signal_vectors[300:, 0])

    assert table["size"] == [1, 2, 4, 8, 16, 32, 64]
    for key in ("mean", "max", "p50", "p90", "p99", "p99.9"):
        assert all(later <= earlier for earlier, later in itertools.pairwise(table[key])), key
    assert table["mean"][0] > 10 * table["mean"][-1]


def test_mismatch_is_zero_when_the_basis_has_the_full_rank(signal_vectors):
    full_rank = 2 * NUM_BINS
    basis, _ = fit_basis(signal_vectors[:300, 1], full_rank)

    table = mismatch_table(basis, signal_vectors[300:, 1])

    assert table["size"][-1] == full_rank
    assert table["max"][-1] < 1e-10
