"""The simulate step: event files and ASD files of the toy problem, seeded."""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .. import seeds
from ..config import Settings
from ..detectors import write_asd_file
from ..events import write_event_file
from ..priors import make_priors, sample_priors
from .noise import fiducial_asd, frequency_grid, varied_asds
from .ringdown import ringdown_polarisations

log = logging.getLogger(__name__)


def simulate(settings: Settings, event_paths: Sequence[str | Path], fiducial_path: str | Path,
             asd_set_path: str | Path) -> np.ndarray:
    """Write the toy problem's files; `settings` is config.simulation_settings(config).

    event_paths: list of event-file paths (one file of `events_per_file` each);
    the ASD files hold one fiducial ASD, and `asd.num_asds` varied ones, per detector."""
    generator = seeds.generator(settings["seed"], "simulate")
    detector_names = list(settings["detectors"])
    priors = make_priors(settings["intrinsic_prior"])
    simulation = settings["simulation"]
    frequencies = frequency_grid(**simulation["frequencies"])
    for path in tqdm(event_paths, desc="simulate", mininterval=2):
        labels: dict[str, Any] = sample_priors(priors, simulation["events_per_file"], generator)  # tensors, then arrays
        h_plus, h_cross = ringdown_polarisations(labels["f0"], labels["tau"], frequencies)
        data = {"h_plus": h_plus.to(torch.complex64).numpy(), "h_cross": h_cross.to(torch.complex64).numpy()}
        labels = {k: v.numpy() for k, v in labels.items()}
        write_event_file(path, labels, data, "signals", frequencies.numpy(), settings)
        log.info("wrote %s (%d events)", path, simulation["events_per_file"])
    asd = simulation["asd"]
    fiducial = {d: fiducial_asd(frequencies, level) for d, level in zip(detector_names, asd["levels"], strict=True)}
    write_asd_file(fiducial_path, frequencies, {d: a[None, :].numpy() for d, a in fiducial.items()}, settings)
    varied = {
        d: varied_asds(a, asd["num_asds"], asd["level_scatter"], asd["shape_scatter"], generator).numpy()
        for d, a in fiducial.items()
    }
    write_asd_file(asd_set_path, frequencies, varied, settings)
    log.info("wrote %s and %s (%d ASDs per detector)", fiducial_path, asd_set_path, asd["num_asds"])
    return np.asarray(frequencies)
