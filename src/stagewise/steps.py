"""The preprocessing steps of the DAG (count_events, fit_trafo, build_svd) and the simulated
observed set (simulate_observed), called by the workflow's scripts and by tests.

Each takes the settings subset of its rule (config.*_settings), its input paths and its
output paths. The training and evaluation steps are training.stage.train_stage and
evaluate.run.evaluate.
"""

import logging

import torch

from . import seeds
from .config import Problem, Settings
from .data import StrainSimulator
from .detectors import Detectors, read_asd_file
from .events import OBSERVATION_DATASET, SIGNAL_DATASETS, count_splits, read_events
from .files import write_yaml
from .observed import write_observed_file
from .priors import make_priors, sample_priors
from .simulate.noise import frequency_grid
from .simulate.ringdown import ringdown_polarisations
from .sources import make_simulator
from .svd import build_observation_svd, build_svd, save_svd
from .trafo import Trafo, fit_trafo, observation_batches, signal_batches

log = logging.getLogger(__name__)


def count_events_step(settings: Settings, splits: dict[str, list[str]], output: str) -> None:
    """counts.yaml: events per file and total per split, written only when every file passed:
    layout and shapes from metadata, labels finite and inside their priors and, for observations,
    inputs finite, read in contiguous chunks, each file opened once."""
    problem = Problem.from_settings(settings)
    counts = count_splits(splits, settings["data"]["kind"], problem.label_priors())
    write_yaml(output, counts)


def fit_trafo_step(settings: Settings, trafo_files: list[str], fiducial_asd: str | None, output: str) -> None:
    """trafo.h5: label and input standardisation fitted on the trafo split (signals: with fresh noise)."""
    problem, trafo_config = Problem.from_settings(settings), settings["trafo"]
    size, count = trafo_config["batch_size"], trafo_config["num_batches"]
    if problem.observations:
        batches = observation_batches(trafo_files, problem.label_names, count, size)
    else:
        simulator = make_simulator(problem, trafo_files[0], fiducial_asd)
        batches = signal_batches(trafo_files, problem.label_names, simulator, count, size, settings["seed"])
    trafo = fit_trafo(batches, problem.inference_parameters, trafo_config["log_labels"],
                      trafo_config["standardize_inputs"], trafo_config["log_inputs"])
    trafo.save(output, settings)


def build_svd_step(settings: Settings, training_files: list[str], fiducial_asd: str | None, trafo_path: str,
                   outputs: dict[str, str]) -> None:
    """svd_<name>.h5 for each detector (signals) or for "inputs" (observations); outputs maps name to path."""
    problem, svd = Problem.from_settings(settings), settings["svd"]
    needed = svd["num_training_samples"] + svd["num_validation_samples"]
    dataset = (OBSERVATION_DATASET,) if problem.observations else SIGNAL_DATASETS
    _, data = read_events(training_files, [], dataset, limit=needed)
    if len(data[dataset[0]]) < needed:
        raise ValueError(f"svd: num_training_samples + num_validation_samples = {needed}, "
                         f"but the training split holds {len(data[dataset[0]])} events")
    trafo = Trafo.load(trafo_path)
    if problem.observations:
        results = build_observation_svd(trafo, torch.as_tensor(data[OBSERVATION_DATASET]), svd["size"],
                                        svd["num_training_samples"])
    else:
        simulator = make_simulator(problem, training_files[0], fiducial_asd)
        h_plus, h_cross = (torch.as_tensor(data[k]) for k in SIGNAL_DATASETS)
        results = build_svd(simulator, trafo, h_plus, h_cross, svd["size"], svd["num_training_samples"],
                            settings["seed"])
    for name, (basis, singular_values, table) in results.items():
        save_svd(outputs[name], name, basis, singular_values, table, settings)


def simulate_observed_step(settings: Settings, fiducial_asd: str, asd_set: str, output: str) -> None:
    """observed.h5: settings["simulated_events"] events of the embedded problem as an experiment records
    them: parameters from their priors, each event measured with an ASD drawn from the ASD set, its noisy
    unwhitened strain, and every parameter's truth as a label. settings: config.observed_simulation_settings."""
    count, generator = settings["simulated_events"], seeds.generator(settings["seed"], "observed")
    frequencies = frequency_grid(**settings["simulation"]["frequencies"])
    detectors = Detectors(settings["detectors"])
    simulator = StrainSimulator(frequencies, detectors, make_priors(settings["extrinsic_prior"]),
                                read_asd_file(fiducial_asd, detectors.names, frequencies.numpy())[0],
                                read_asd_file(asd_set, detectors.names, frequencies.numpy()), 1, "cpu")
    intrinsic = sample_priors(make_priors(settings["intrinsic_prior"]), count, generator)
    h_plus, h_cross = ringdown_polarisations(intrinsic["f0"], intrinsic["tau"], frequencies)
    parameters, inputs, _, asds = simulator.draw(h_plus.to(torch.complex64), h_cross.to(torch.complex64), intrinsic,
                                                 generator, "set")
    strain = torch.complex(inputs[:, :, 0].double(), inputs[:, :, 1].double()) * asds.double()
    write_observed_file(output, torch.arange(count).numpy(), frequencies=frequencies.numpy(),
                        strain={d: strain[:, i].numpy() for i, d in enumerate(detectors.names)},
                        asds={d: asds[:, i].double().numpy() for i, d in enumerate(detectors.names)},
                        labels={k: v.double().numpy() for k, v in parameters.items()}, settings=settings)
    log.info("wrote %s (%d events)", output, count)
