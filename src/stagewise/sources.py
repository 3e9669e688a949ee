"""Where the network's batches come from: signals plus fresh noise, or ready observations.

A source reads event files into an EventBank and turns the events at an index into a
batch (theta in network space (B, P), inputs (B, C, n), ASD features (B, A)). The
stage runner, the model and the evaluation need nothing else of the kind of data.
"""

import torch

from .data import EventBank, event_bank
from .events import OBSERVATION_DATASET, SIGNAL_DATASETS, read_events, split_layout
from .problem import intrinsic_names, make_simulator, observations


class Source:
    """What both kinds share: reading a split's events."""

    def bank(self, files, limit=None):
        """A training or validation split (streamed when larger than local.memory_limit_mb), or with
        `limit` the first `limit` events in memory."""
        if limit is not None:
            return EventBank(*read_events(files, self.names, self.datasets, limit=limit), self.device)
        return event_bank(files, self.names, self.datasets, self.config["data"]["shuffle"],
                          self.config["local"]["memory_limit_mb"], self.device)


class SignalSource(Source):
    """Noise-free signals, projected, whitened and given fresh noise for every batch."""

    datasets = SIGNAL_DATASETS

    def __init__(self, config, event_file, fiducial_asd, asd_set, device):
        self.config = config
        self.simulator = make_simulator(config, event_file, fiducial_asd, asd_set, device,
                                        config["model"]["num_asd_bands"])
        self.names = intrinsic_names(config)
        self.device = torch.device(device)
        self.num_channels = len(self.simulator.detectors.names)
        self.num_inputs = 2 * len(self.simulator.frequencies)
        self.num_asd_features = self.simulator.num_asd_features

    def injections(self, bank, index, generator, asd):
        """(physical parameters, inputs (B, D, 2, F), ASD features, whitened data complex (B, D, F), ASDs)."""
        labels, data = bank.take(index)
        parameters, inputs, features, asds = self.simulator.draw(data["h_plus"], data["h_cross"], labels, generator,
                                                                 asd)
        whitened = torch.complex(inputs[:, :, 0].double(), inputs[:, :, 1].double())
        return parameters, inputs, features, whitened, asds

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

    def __init__(self, config, num_inputs, device):
        self.config = config
        self.names = intrinsic_names(config)
        self.device = torch.device(device)
        self.num_channels, self.num_inputs, self.num_asd_features = 1, num_inputs, 0

    def injections(self, bank, index, generator=None, asd=None):
        """(labels, inputs (B, 1, K), empty ASD features, None, None): there is no likelihood."""
        labels, data = bank.take(index)
        inputs = data[OBSERVATION_DATASET][:, None, :]
        return labels, inputs, torch.zeros(len(inputs), 0, device=inputs.device), None, None

    def batch_maker(self, bank, trafo, asd=None):
        def make(index, generator):
            labels, inputs, features, _, _ = self.injections(bank, index)
            return trafo.labels_to_network(labels), trafo.inputs_to_network(inputs), features
        return make


def make_source(config, event_file, fiducial_asd=None, asd_set=None, device="cpu"):
    """The source of this config's kind of data; `event_file` gives the shape of the data."""
    if observations(config):
        _, per_event = split_layout([event_file], (OBSERVATION_DATASET,))
        (num_inputs,), _ = per_event[OBSERVATION_DATASET]
        return ObservationSource(config, num_inputs, device)
    return SignalSource(config, event_file, fiducial_asd, asd_set, device)
