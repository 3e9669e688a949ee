"""One function per step of the DAG, called by the workflow's scripts (and by tests).

Each takes the settings subset of its rule (config.*_settings, plus `local` where it
runs on a device), its input paths and its output paths.
"""

import logging

import torch

from .events import SIGNAL_DATASETS, count_splits, read_events
from .files import write_yaml
from .problem import intrinsic_names, make_simulator
from .svd import build_svd, save_svd
from .trafo import Trafo, fit_trafo

log = logging.getLogger(__name__)


def count_events_step(splits, output):
    """counts.yaml: events per file and total per split, from HDF5 metadata only."""
    write_yaml(output, count_splits(splits))


def fit_trafo_step(settings, trafo_files, fiducial_asd, output):
    simulator = make_simulator(settings, trafo_files[0], fiducial_asd)
    trafo_config = settings["trafo"]
    trafo = fit_trafo(
        trafo_files, intrinsic_names(settings), simulator, settings["inference_parameters"],
        trafo_config["log_labels"], trafo_config["num_batches"], trafo_config["batch_size"],
        settings["seed"], trafo_config["standardize_inputs"],
    )
    trafo.save(output, settings)


def build_svd_step(settings, training_files, fiducial_asd, trafo_path, outputs):
    """svd_<detector>.h5 for each detector; outputs maps detector name to path."""
    svd = settings["svd"]
    needed = svd["num_training_samples"] + svd["num_validation_samples"]
    simulator = make_simulator(settings, training_files[0], fiducial_asd)
    _, data = read_events(training_files, [], SIGNAL_DATASETS, limit=needed)
    if len(data["h_plus"]) < needed:
        raise ValueError(f"svd: num_training_samples + num_validation_samples = {needed}, "
                         f"but the training split holds {len(data['h_plus'])} events")
    h_plus, h_cross = (torch.as_tensor(data[k]) for k in SIGNAL_DATASETS)
    results = build_svd(simulator, Trafo.load(trafo_path), h_plus, h_cross, svd["size"],
                        svd["num_training_samples"], settings["seed"])
    for detector, (basis, singular_values, table) in results.items():
        save_svd(outputs[detector], detector, basis, singular_values, table, settings)
