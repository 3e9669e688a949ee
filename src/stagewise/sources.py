"""Where the network's batches come from: signals plus fresh noise, or ready observations.

A source reads event files into an EventBank and turns the events at an index into a
batch (theta in network space (B, P), inputs (B, C, n), ASD features (B, A)). The
stage runner, the model and the evaluation need nothing else of the kind of data.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .config import Problem, Settings
from .data import EventBank, StrainSimulator, event_bank
from .detectors import Detectors, read_asd_file
from .events import OBSERVATION_DATASET, SIGNAL_DATASETS, read_events, read_frequencies, split_layout
from .priors import make_priors
from .trafo import Trafo

BUNDLE_FORMAT = 1  # the version of the inference bundle that model files carry


class Injections(NamedTuple):
    """Events with known parameters, as the network and the likelihood see them."""

    parameters: dict[str, torch.Tensor]  # physical values, float64 (B,) each
    inputs: torch.Tensor  # (B, D, 2, F) whitened noisy strain, or (B, 1, K) observations
    asd_features: torch.Tensor  # (B, A); A = 0 for observations
    whitened_data: torch.Tensor | None  # complex128 (B, D, F); None for observations (no likelihood)
    asds: torch.Tensor | None  # (B, D, F) the ASD that whitened each event; None for observations


def make_simulator(problem: Problem, event_file: str, fiducial_asd_file: str | None, asd_set_file: str | None = None,
                   device: str | torch.device = "cpu", num_asd_bands: int = 1) -> StrainSimulator:
    """The StrainSimulator of this problem; ASDs are checked against the event file's frequencies.

    num_asd_bands only shapes the ASD features, which the trafo and SVD steps do not use."""
    if fiducial_asd_file is None:
        raise ValueError("data.fiducial_asd_file: signals need the fiducial ASD file")
    frequencies = read_frequencies(event_file)
    detectors = Detectors(problem.detectors)
    fiducial = read_asd_file(fiducial_asd_file, detectors.names, frequencies)[0]
    asd_set = None if asd_set_file is None else read_asd_file(asd_set_file, detectors.names, frequencies)
    return StrainSimulator(frequencies, detectors, make_priors(problem.extrinsic_prior), fiducial, asd_set,
                           num_asd_bands, torch.device(device), problem.gnpe_kernel)


class Source:
    """What both kinds share: reading a split's events."""

    names: list[str]
    datasets: tuple[str, ...]
    device: torch.device
    num_channels: int
    num_inputs: int
    num_asd_features: int

    def bank(self, files: list[str], shuffle: Settings, memory_limit_mb: float) -> EventBank:
        """A training or validation split, streamed from its files when larger than `memory_limit_mb`;
        shuffle: config `data.shuffle`."""
        return event_bank(files, self.names, self.datasets, shuffle, memory_limit_mb, self.device)

    def first_events(self, files: list[str], count: int) -> EventBank:
        """The first `count` events of `files` (fewer when they hold fewer), in memory."""
        labels, data = read_events(files, self.names, self.datasets, limit=count)
        return EventBank(labels, data, self.device)

    def injections(self, bank: EventBank, index: torch.Tensor, generator: torch.Generator, asd: str) -> Injections:
        """The events at `index` with everything drawn that training draws (`asd`: fiducial or set)."""
        raise NotImplementedError

    def batch_maker(self, bank: EventBank, trafo: Any, asd: str) -> Callable[[torch.Tensor, torch.Generator], Any]:
        """A function (index, generator) -> (theta, network inputs, ASD features) over `bank`."""
        raise NotImplementedError


class SignalSource(Source):
    """Noise-free signals, projected, whitened and given fresh noise for every batch."""

    datasets = SIGNAL_DATASETS

    def __init__(self, problem: Problem, simulator: StrainSimulator):
        self.simulator = simulator
        self.names = problem.label_names
        self.device = simulator.device
        self.num_channels = len(simulator.detectors.names)
        self.num_inputs = 2 * len(simulator.frequencies)
        self.num_asd_features = simulator.num_asd_features

    def injections(self, bank: EventBank, index: torch.Tensor, generator: torch.Generator, asd: str) -> Injections:
        labels, data = bank.take(index)
        parameters, inputs, features, asds = self.simulator.draw(data["h_plus"], data["h_cross"], labels, generator,
                                                                 asd)
        whitened = torch.complex(inputs[:, :, 0].double(), inputs[:, :, 1].double())
        return Injections(parameters, inputs, features, whitened, asds)

    def batch_maker(self, bank, trafo, asd):
        """A function (index, generator) -> (theta, network inputs, ASD features)."""
        def make(index, generator):
            labels, data = bank.take(index)
            parameters, inputs, features = self.simulator(data["h_plus"], data["h_cross"], labels, generator, asd)
            return trafo.labels_to_network(parameters), trafo.inputs_to_network(inputs), features
        return make


class ObservationSource(Source):
    """Network inputs and labels as stored in the event files (one channel of K features)."""

    datasets = (OBSERVATION_DATASET,)

    def __init__(self, problem: Problem, num_inputs: int, device: str | torch.device):
        self.names = problem.label_names
        self.device = torch.device(device)
        self.num_channels, self.num_inputs, self.num_asd_features = 1, num_inputs, 0

    def injections(self, bank: EventBank, index: torch.Tensor, generator: torch.Generator | None = None,
                   asd: str | None = None) -> Injections:  # type: ignore[override]
        """The events at `index` as stored: there is no likelihood, so no whitened data or ASDs."""
        labels, data = bank.take(index)
        inputs = data[OBSERVATION_DATASET][:, None, :]
        return Injections(labels, inputs, torch.zeros(len(inputs), 0, device=inputs.device), None, None)

    def batch_maker(self, bank, trafo, asd=None):
        def make(index, generator):
            labels, inputs, features, _, _ = self.injections(bank, index)
            return trafo.labels_to_network(labels), trafo.inputs_to_network(inputs), features
        return make


def make_source(problem: Problem, event_file: str, fiducial_asd: str | None = None, asd_set: str | None = None,
                device: str | torch.device = "cpu", num_asd_bands: int = 1) -> SignalSource | ObservationSource:
    """The source of this problem's kind of data; `event_file` gives the shape of the data."""
    if problem.observations:
        _, per_event = split_layout([event_file], (OBSERVATION_DATASET,))
        (num_inputs,), _ = per_event[OBSERVATION_DATASET]
        return ObservationSource(problem, num_inputs, device)
    return SignalSource(problem, make_simulator(problem, event_file, fiducial_asd, asd_set, device, num_asd_bands))


def inference_bundle(problem_settings: Settings, source: Source, trafo: Trafo) -> dict[str, Any]:
    """What a stage model file carries so that `infer` needs no other file: the problem (kind of data,
    inference parameters, priors, detectors), the trafo, and for signals the frequency grid, the
    fiducial ASD and the number of ASD bands; for observations the number of inputs K."""
    bundle: dict[str, Any] = {"format": BUNDLE_FORMAT, "problem": problem_settings, "trafo": trafo.to_dict()}
    if isinstance(source, SignalSource):
        simulator = source.simulator
        bundle |= {"frequencies": simulator.frequencies.cpu(), "fiducial_asd": simulator.fiducial_asd.cpu(),
                   "num_asd_bands": simulator.num_asd_bands}
    else:
        bundle["num_inputs"] = source.num_inputs
    return bundle


@dataclass(frozen=True)
class Bundle:
    """A model file's inference bundle, rebuilt: see inference_bundle."""

    problem: Problem
    settings: Settings  # the problem's settings as stored
    trafo: Trafo
    simulator: StrainSimulator | None  # signals; None for observations
    num_inputs: int  # K for observations; 2F for signals
    gnpe: dict[str, Any] | None = None  # GNPE: {kernel, init: {architecture, model, trafo}} (stage.gnpe_bundle)

    @classmethod
    def read(cls, values: Mapping[str, Any] | None, path: str, device: str | torch.device = "cpu") -> "Bundle":
        """The bundle of model file `path` (values: what the file holds under "inference")."""
        if not values:
            raise ValueError(f"{path}: this model file carries no inference bundle (written before 2026-12): rerun "
                             "its stage with this version (snakemake --forcerun train_stage_<k>: a finished stage "
                             "resumes from its last checkpoint, after `stagewise convert` if that is older, and "
                             "only rewrites the model file)")
        if values.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{path}: inference bundle format {values.get('format')!r}, this version reads "
                             f"{BUNDLE_FORMAT}")
        settings = values["problem"]
        problem = Problem.from_settings(settings)
        trafo = Trafo.from_dict(values["trafo"])
        if problem.observations:
            return cls(problem, settings, trafo, None, int(values["num_inputs"]))
        frequencies = torch.as_tensor(values["frequencies"], dtype=torch.float64)
        simulator = StrainSimulator(frequencies, Detectors(problem.detectors), make_priors(problem.extrinsic_prior),
                                    torch.as_tensor(values["fiducial_asd"]), None, int(values["num_asd_bands"]),
                                    device)
        return cls(problem, settings, trafo, simulator, 2 * len(frequencies), values.get("gnpe"))
