"""GNPE, a free arrival time: moving whitened data in time, training batches aligned to proxies, the
Gibbs sampler's bounds and proxy density, the config checks, and a tiny free-time run through Snakemake
(train_init in the DAG, resumable; the gnpe outputs of evaluate and infer; what a change reruns)."""

import copy
import math
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from snakemake.utils import update_config

from helpers import REPO, copy_workflow, planned_jobs, snakemake
from stagewise import config as settings_module
from stagewise.artefacts import describe_model
from stagewise.data import StrainSimulator, shift_time
from stagewise.detectors import Detectors
from stagewise.evaluate.gnpe import GibbsSettings, GNPESampler, ProxyDensity, ks_pvalue
from stagewise.models.posterior import PosteriorModel
from stagewise.priors import make_priors
from stagewise.simulate.noise import fiducial_asd, frequency_grid
from stagewise.simulate.ringdown import ringdown_polarisations
from stagewise.trafo import Trafo
from stagewise.training.runner import StageStopped
from stagewise.training.stage import StageInputs, StageOutputs, train_stage

FREE_TIME = ("config/config.yaml", "tiny.yaml", "tiny_free_time.yaml")
KERNEL = 0.001


def free_time_config():
    """The merged config of the tiny free-time run, validated (defaults filled) as Snakemake does."""
    config = {}
    for name in ("config/config.yaml", "tests/configs/tiny.yaml", "tests/configs/tiny_free_time.yaml"):
        update_config(config, yaml.safe_load((REPO / name).read_text()))
    settings_module.validate(config)
    return config


def simulator(kernel=None, dtype=torch.complex128):
    """The default problem's simulator with a free time (+-20 ms), and its polarisations of 64 events."""
    config = free_time_config()
    frequencies = frequency_grid(20.0, 512.0, 1.0)
    detectors = Detectors(config["detectors"])
    fiducial = torch.stack([fiducial_asd(frequencies, level) for level in (1.0, 1.2)])
    sim = StrainSimulator(frequencies, detectors, make_priors(config["extrinsic_prior"]), fiducial, None, 4, "cpu",
                          kernel)
    generator = torch.Generator().manual_seed(3)
    f0 = 50 + 200 * torch.rand(64, generator=generator, dtype=torch.float64)
    tau = 10 ** (-2 + torch.rand(64, generator=generator, dtype=torch.float64))
    h_plus, h_cross = ringdown_polarisations(f0, tau, frequencies)
    return sim, h_plus.to(dtype), h_cross.to(dtype), {"f0": f0, "tau": tau}


def test_moving_whitened_data_in_time_equals_simulating_the_signal_at_the_shifted_time():
    sim, h_plus, h_cross, _ = simulator()
    generator = torch.Generator().manual_seed(4)
    extrinsic = {name: prior.sample(64, generator) for name, prior in sim.extrinsic_priors.items()}
    dt = 0.04 * torch.rand(64, generator=generator, dtype=torch.float64) - 0.02
    at_t = torch.view_as_real(sim.whitened_signals(h_plus, h_cross, extrinsic)).transpose(-1, -2)
    later = sim.whitened_signals(h_plus, h_cross, {**extrinsic, "time": extrinsic["time"] + dt})
    moved = shift_time(at_t, dt, sim.frequencies)
    assert torch.view_as_real(later).transpose(-1, -2).abs().max() > 0.1  # signals, not zeros
    assert (moved - torch.view_as_real(later).transpose(-1, -2)).abs().max() < 1e-10
    unmoved = shift_time(at_t, torch.zeros(64, dtype=torch.float64), sim.frequencies)
    assert (unmoved - at_t).abs().max() < 1e-15


def test_moving_white_noise_in_time_keeps_every_bin_standard_normal():
    frequencies = frequency_grid(20.0, 512.0, 1.0)
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(4000, 2, 2, len(frequencies), generator=generator, dtype=torch.float64)
    dt = 0.04 * torch.rand(4000, generator=generator, dtype=torch.float64) - 0.02
    moved = shift_time(noise, dt, frequencies)
    assert torch.allclose(moved.square().sum(2), noise.square().sum(2), atol=1e-12)  # each bin keeps its modulus
    assert not torch.allclose(moved, noise)
    real, imaginary = moved[:, :, 0], moved[:, :, 1]
    n = len(moved)  # per bin, over the samples: mean 0, variance 1, real and imaginary parts uncorrelated
    mean_error, variance_error = 1 / math.sqrt(n), math.sqrt(2 / n)
    for statistic, expected, sigma in ((real.mean(0), 0.0, mean_error), (imaginary.mean(0), 0.0, mean_error),
                                       (real.var(0), 1.0, variance_error), (imaginary.var(0), 1.0, variance_error),
                                       ((real * imaginary).mean(0), 0.0, mean_error)):
        assert (statistic - expected).abs().max() < 5.5 * sigma


def test_training_batches_are_aligned_to_proxies_within_the_kernel():
    sim, h_plus, h_cross, intrinsic = simulator(KERNEL, torch.complex64)
    parameters, inputs, _ = sim(h_plus, h_cross, intrinsic, torch.Generator().manual_seed(6))
    generator = torch.Generator().manual_seed(6)
    measured, raw, _, _ = sim.draw(h_plus, h_cross, intrinsic, generator)
    proxies = sim.proxies(measured["time"], generator)
    assert measured["time"].abs().max() > 10 * KERNEL  # the time is free, over +-20 ms
    assert torch.equal(parameters["time"], measured["time"] - proxies)
    assert parameters["time"].abs().max() <= KERNEL
    assert torch.equal(inputs, shift_time(raw, -proxies, sim.frequencies))


def tiny_sampler(bounds):
    """A GNPE sampler of untrained tiny networks on the default grid (the bounds do not need a trained one)."""
    frequencies = frequency_grid(20.0, 512.0, 8.0)
    width = 2 * len(frequencies)
    arch = dict(num_detectors=2, num_inputs=width, svd_size=8, num_asd_features=0, embedding={"hidden_dims": [16],
                "output_dim": 8}, flow={"num_transforms": 1, "hidden_dim": 8, "num_blocks": 1, "num_bins": 4,
                                        "tail_bound": 4.0})
    torch.manual_seed(0)
    network, init = PosteriorModel({**arch, "num_parameters": 2}), PosteriorModel({**arch, "num_parameters": 1})
    inputs = (torch.zeros(2, 2, len(frequencies)), torch.ones(2, 2, len(frequencies)))
    trafo = Trafo(["f0", "time"], [150.0, 0.0], [50.0, KERNEL / math.sqrt(3)], [False, False], *inputs)
    init_trafo = Trafo(["time"], [0.0], [0.02 / math.sqrt(3)], [False], *inputs)
    return GNPESampler(network.eval(), trafo, init.eval(), init_trafo, KERNEL, frequencies, bounds)


def test_gibbs_iterations_stop_at_convergence_within_their_bounds():
    data = torch.randn(2, len(frequency_grid(20.0, 512.0, 8.0)), dtype=torch.complex128)
    features = torch.zeros(1, 0)

    def iterations(bounds):
        return tiny_sampler(bounds).gibbs(data, features, 300, torch.Generator().manual_seed(7)).iterations

    assert iterations(GibbsSettings(min=3, max=6, ks_pvalue=1e-300)) == 3  # converged as soon as allowed
    assert iterations(GibbsSettings(min=1, max=5, ks_pvalue=1 - 1e-12)) == 5  # never converged: the cap
    chains = tiny_sampler(GibbsSettings(min=2, max=4)).gibbs(data, features, 300, torch.Generator().manual_seed(7))
    again = tiny_sampler(GibbsSettings(min=2, max=4)).gibbs(data, features, 300, torch.Generator().manual_seed(7))
    assert torch.equal(chains.samples, again.samples)  # seeded
    assert 2 <= chains.iterations <= 4


def test_the_importance_pass_weighs_by_the_kernel_and_the_proxy_density():
    sampler = tiny_sampler(GibbsSettings())
    data = torch.randn(2, len(sampler.frequencies), dtype=torch.complex128)
    generator = torch.Generator().manual_seed(8)
    proxies = 0.003 + KERNEL * (2 * torch.rand(500, generator=generator, dtype=torch.float64) - 1)
    draw = sampler.importance_draw(data, torch.zeros(1, 0), ProxyDensity(proxies), 500, generator)
    offsets = draw.samples[:, 1] - draw.proxies
    inside = offsets.abs() <= KERNEL
    assert inside.any() and (~inside).any()  # an untrained network leaks beyond the kernel
    assert torch.all(draw.delta_log_prob_target[inside] == -math.log(2 * KERNEL))
    assert torch.all(draw.delta_log_prob_target[~inside] == -math.inf)
    assert torch.isfinite(draw.log_prob).all()
    fractions = sampler.edge_fractions(offsets)
    assert fractions["outside_kernel_fraction"] == pytest.approx(float((~inside).double().mean()))
    assert fractions["edge_fraction"] >= fractions["outside_kernel_fraction"]


def test_the_proxy_density_is_normalised_and_samples_itself():
    generator = torch.Generator().manual_seed(9)
    points = 0.01 + 0.001 * torch.randn(3000, generator=generator, dtype=torch.float64)
    density = ProxyDensity(points)
    grid = torch.linspace(0.0, 0.02, 4001, dtype=torch.float64)
    assert torch.trapezoid(density.log_prob(grid).exp(), grid) == pytest.approx(1.0, abs=1e-6)
    drawn = density.sample(20000, generator)
    assert float(drawn.mean()) == pytest.approx(0.01, abs=5e-5)
    assert ks_pvalue(drawn[:3000], points) > 0.01
    assert ks_pvalue(drawn[:3000] + 0.0005, points) < 1e-6


@pytest.mark.parametrize("change, message", [
    ({"inference_parameters": ["f0", "tau", "snr"]}, "gnpe: 'time' must be in inference_parameters"),
    ({"gnpe": {"kernel": 0.03}}, "gnpe.kernel: 0.03 s must be below half the width of extrinsic_prior.time"),
    ({"gnpe": {"init": {"training": {"freeze_svd": True}}}}, "gnpe.init.training.freeze_svd: the init network"),
    ({"gnpe": {"iterations": {"min": 5, "max": 3}}}, "gnpe.iterations.min: 5 exceeds max (3)"),
    ({"model": {"type": "gaussian_regression"}}, "gnpe: needs model.type flow"),
], ids=["time not inferred", "kernel too wide", "init frozen", "iteration bounds", "regression"])
def test_a_bad_gnpe_config_stops_naming_the_key(change, message):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())  # the default: a free time with GNPE
    update_config(config, copy.deepcopy(change))
    with pytest.raises(ValueError, match=None) as error:
        settings_module.validate(config)
    assert message in str(error.value)


@pytest.fixture(scope="module")
def free_time_run(tmp_path_factory):
    """The tiny free-time run: (workdir, the jobs it ran)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("free_time"))
    shutil.copy(REPO / "tests/configs/tiny_free_time.yaml", workdir)
    jobs = planned_jobs(snakemake(workdir, configfiles=FREE_TIME).output)
    return workdir, jobs


@pytest.mark.slow
def test_a_free_time_run_trains_the_init_network_and_reports_gnpe(free_time_run):
    workdir, jobs = free_time_run
    assert "train_init" in jobs
    run = workdir / "results/tiny_free_time"
    metrics = yaml.safe_load((run / "evaluation/metrics.json").read_text())
    bounds = free_time_config()["gnpe"]["iterations"]
    assert "time" in metrics["pp_ks_pvalue"] and "time" in metrics["importance_sampling"]["pp_ks_pvalue"]
    assert metrics["gnpe"]["kernel"] == KERNEL
    assert bounds["min"] <= metrics["gnpe"]["iterations_median"] <= bounds["max"]
    table = pd.read_csv(run / "evaluation/gnpe.csv")
    assert len(table) == metrics["num_injections"]
    assert table["iterations"].between(bounds["min"], bounds["max"]).all()
    assert set(table.columns) >= {"ks_pvalue", "outside_kernel_fraction", "edge_fraction", "efficiency"}
    divergence = metrics["network_vs_exact"]  # the Gibbs samples against the importance-weighted pass
    assert divergence["injections_used"] + divergence["injections_left_out"] == metrics["num_injections"]
    assert divergence["injections_used"] == 0 or 0 <= divergence["time"]["jsd_median"] <= math.log(2)
    for plot in ("gnpe_iterations", "time_posterior"):
        assert (run / f"evaluation/{plot}.png").stat().st_size > 1000
    with h5py.File(run / "inference/simulated/posterior.h5") as f:
        offsets = f["samples/time"][()] - f["samples/time_proxy"][()]
        delta = f["samples/delta_log_prob_target"][()]
        assert np.all((np.abs(offsets) <= KERNEL) == np.isfinite(delta))
        assert np.all(f["events/gnpe_iterations"][()] >= bounds["min"])
        assert np.all(f["samples/weights"][()][~np.isfinite(delta)] == 0)
    model = torch.load(run / "stage_1/model_stage_1.pt", weights_only=True)
    assert model["inference"]["gnpe"]["init"]["trafo"]["names"] == ["time"]
    description = " ".join(describe_model(run / "stage_1/model_stage_1.pt").split())  # YAML wraps long lines
    assert "gnpe: 'kernel 0.001 s, with its init network (the time alone)'" in description


@pytest.mark.slow
def test_the_init_network_resumes_bit_for_bit(free_time_run, tmp_path):
    """train_init goes through the stages' trainer: stopped after its first epoch (exit 75) and run again,
    it ends with the weights of the run's uninterrupted train_init."""
    workdir, _ = free_time_run
    run = workdir / "results/tiny_free_time"
    config = free_time_config()
    data = run / "data"
    inputs = StageInputs([str(data / f"training_{i:02d}.h5") for i in range(2)], [str(data / "validation_00.h5")],
                         str(run / "trafo.h5"), {}, str(data / "fiducial_asd.h5"), str(data / "asd_set.h5"), None)
    outputs = StageOutputs(str(tmp_path / "model_init.pt"), str(tmp_path / "history.csv"))
    local = copy.deepcopy(config["local"])
    local["runtime_limits"]["max_epochs_per_run"] = 1
    init = settings_module.init_settings(config)
    with pytest.raises(StageStopped):
        train_stage(init, local, "init", inputs, outputs, tmp_path / "checkpoints", threads=2)
    train_stage(init, local, "init", inputs, outputs, tmp_path / "checkpoints", threads=2)
    resumed = torch.load(outputs.model, weights_only=True)["model"]
    reference = torch.load(run / "init/model_init.pt", weights_only=True)["model"]
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("change, expected", [
    ({"gnpe": {"iterations": {"max": 5}}}, {"evaluate", "infer_set"}),
    ({"gnpe": {"init": {"training": {"epochs": 3}}}}, {"train_init", "train_stage_0", "train_stage_1", "evaluate",
                                                        "infer_set"}),
    ({"gnpe": {"kernel": 0.002}}, {"fit_trafo", "build_svd", "train_init", "train_stage_0", "train_stage_1",
                                   "evaluate", "infer_set"}),
], ids=["iterations", "init training", "kernel"])
def test_a_gnpe_change_plans_exactly_the_steps_it_touches(free_time_run, change, expected):
    workdir, _ = free_time_run
    overrides = yaml.safe_load((REPO / "tests/configs/tiny_free_time.yaml").read_text())
    update_config(overrides, change)
    (workdir / "change.yaml").write_text(yaml.safe_dump(overrides))
    result = snakemake(workdir, "-n", configfiles=(*FREE_TIME[:-1], "change.yaml"))
    assert planned_jobs(result.output) == expected | {"all"}


def test_a_gnpe_section_reads_the_same_whatever_the_key_order_of_its_file():
    """Snakemake compares params as text: a gnpe section that a later config file replaces whole (after a
    `gnpe: null`) must give train_init and evaluate the same params in any key order."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    reordered = copy.deepcopy(config)
    gnpe = reordered["gnpe"]
    reordered["gnpe"] = {"iterations": dict(sorted(gnpe["iterations"].items())), "kernel": gnpe["kernel"],
                         "init": {key: dict(sorted(value.items())) for key, value in reversed(gnpe["init"].items())}}
    for each in (config, reordered):
        settings_module.validate(each)
    assert str(settings_module.init_settings(reordered)) == str(settings_module.init_settings(config))
    assert str(settings_module.evaluation_settings(reordered)) == str(settings_module.evaluation_settings(config))
