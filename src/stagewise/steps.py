"""One function per step of the DAG, called by the workflow's scripts (and by tests).

Each takes the settings subset of its rule (config.*_settings, plus `local` where it
runs on a device), its input paths and its output paths.
"""

import logging

import torch

from .events import OBSERVATION_DATASET, SIGNAL_DATASETS, count_splits, read_events
from .files import write_yaml
from .problem import intrinsic_names, label_priors, make_simulator, observations
from .svd import build_observation_svd, build_svd, save_svd
from .trafo import Trafo, fit_trafo, observation_batches, signal_batches

log = logging.getLogger(__name__)


def count_events_step(settings, splits, output):
    """counts.yaml: events per file and total per split, written only when every file passed:
    layout and shapes from metadata, labels finite and inside their priors and, for observations,
    inputs finite, read in contiguous chunks, each file opened once."""
    counts = count_splits(splits, settings["data"]["kind"], label_priors(settings))
    write_yaml(output, counts)


def fit_trafo_step(settings, trafo_files, fiducial_asd, output):
    trafo_config = settings["trafo"]
    size, count = trafo_config["batch_size"], trafo_config["num_batches"]
    if observations(settings):
        batches = observation_batches(trafo_files, intrinsic_names(settings), count, size)
    else:
        simulator = make_simulator(settings, trafo_files[0], fiducial_asd)
        batches = signal_batches(trafo_files, intrinsic_names(settings), simulator, count, size, settings["seed"])
    trafo = fit_trafo(batches, settings["inference_parameters"], trafo_config["log_labels"],
                      trafo_config["standardize_inputs"], trafo_config["log_inputs"])
    trafo.save(output, settings)


def build_svd_step(settings, training_files, fiducial_asd, trafo_path, outputs):
    """svd_<name>.h5 for each detector (signals) or for "inputs" (observations); outputs maps name to path."""
    svd = settings["svd"]
    needed = svd["num_training_samples"] + svd["num_validation_samples"]
    dataset = (OBSERVATION_DATASET,) if observations(settings) else SIGNAL_DATASETS
    _, data = read_events(training_files, [], dataset, limit=needed)
    if len(data[dataset[0]]) < needed:
        raise ValueError(f"svd: num_training_samples + num_validation_samples = {needed}, "
                         f"but the training split holds {len(data[dataset[0]])} events")
    trafo = Trafo.load(trafo_path)
    if observations(settings):
        results = build_observation_svd(trafo, torch.as_tensor(data[OBSERVATION_DATASET]), svd["size"],
                                        svd["num_training_samples"])
    else:
        simulator = make_simulator(settings, training_files[0], fiducial_asd)
        h_plus, h_cross = (torch.as_tensor(data[k]) for k in SIGNAL_DATASETS)
        results = build_svd(simulator, trafo, h_plus, h_cross, svd["size"], svd["num_training_samples"],
                            settings["seed"])
    for name, (basis, singular_values, table) in results.items():
        save_svd(outputs[name], name, basis, singular_values, table, settings)
