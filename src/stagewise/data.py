"""Training samples from noise-free signals plus fresh Gaussian noise, as batched tensor code.

For every sample the extrinsic parameters are drawn from their prior, the
polarisations are projected onto the detectors, scaled to the drawn network SNR
(defined with the fiducial ASD), whitened by an ASD (the fiducial one, or one drawn
from the ASD set) and fresh white noise is added. All of it runs on the training
device, in the order: extrinsic parameters, ASD indices, noise.
"""

import numpy as np
import torch

from .detectors import optimal_snr
from .priors import sample_priors
from .training.batches import EpochBatches


def band_matrix(num_bins, num_bands):
    """(F, num_bands) matrix averaging contiguous frequency bands."""
    matrix = np.zeros((num_bins, num_bands))
    for band, indices in enumerate(np.array_split(np.arange(num_bins), num_bands)):
        matrix[indices, band] = 1.0 / len(indices)
    return matrix


class StrainSimulator:
    """Whitened noisy detector data (B, D, 2, F) from polarisations (B, F).

    fiducial_asd: (D, F); asd_set: (M, D, F) or None. ASD features are the band
    averages of log(ASD / fiducial ASD), (B, D * num_asd_bands): zero for the fiducial ASD.
    """

    def __init__(self, frequencies, detectors, extrinsic_priors, fiducial_asd, asd_set, num_asd_bands, device):
        self.device = torch.device(device)
        self.frequencies = torch.as_tensor(frequencies, dtype=torch.float64, device=self.device)
        self.detectors = detectors
        self.extrinsic_priors = extrinsic_priors
        self.fiducial_asd = torch.as_tensor(fiducial_asd, dtype=torch.float32, device=self.device)
        self.asd_set = None if asd_set is None else torch.as_tensor(asd_set, dtype=torch.float32, device=self.device)
        bands = torch.as_tensor(band_matrix(len(frequencies), num_asd_bands), dtype=torch.float32, device=self.device)
        self.num_asd_features = len(detectors.names) * num_asd_bands
        self.set_features = None
        if self.asd_set is not None:
            self.set_features = (torch.log(self.asd_set / self.fiducial_asd) @ bands).flatten(1)

    def signals(self, h_plus, h_cross, extrinsic):
        """Noise-free strain (B, D, F) complex, scaled to the network SNR `extrinsic["snr"]`."""
        strain = self.detectors.project(h_plus, h_cross, extrinsic["phase"], extrinsic["time"], self.frequencies)
        scale = extrinsic["snr"].to(self.device, torch.float32) / optimal_snr(strain, self.fiducial_asd)
        return strain * scale[:, None, None]

    def __call__(self, h_plus, h_cross, intrinsic, generator, asd="fiducial"):
        """One batch: (parameters {name: float64 (B,)}, inputs float32 (B, D, 2, F), asd_features (B, A))."""
        return self.draw(h_plus, h_cross, intrinsic, generator, asd)[:3]

    def draw(self, h_plus, h_cross, intrinsic, generator, asd="fiducial"):
        """As __call__, plus the ASD (B, D, F) that whitened each sample."""
        batch = h_plus.shape[0]
        extrinsic = sample_priors(self.extrinsic_priors, batch, generator)
        strain = self.signals(h_plus, h_cross, extrinsic)
        if asd == "set":
            index = torch.randint(len(self.asd_set), (batch,), generator=generator, device=self.device)
            asds, features = self.asd_set[index], self.set_features[index]
        else:
            asds = self.fiducial_asd.expand(batch, -1, -1)
            features = torch.zeros(batch, self.num_asd_features, device=self.device)
        whitened = strain / asds
        noise = torch.randn((*whitened.shape, 2), generator=generator, device=self.device)
        inputs = torch.stack((whitened.real, whitened.imag), dim=2) + noise.transpose(-1, -2)
        parameters = {**{k: torch.as_tensor(v, device=self.device) for k, v in intrinsic.items()}, **extrinsic}
        return parameters, inputs, features, asds


class EventBank:
    """Events held in memory on the training device: labels {name: float64 (N,)} and data
    {name: (N, ...)}, complex arrays as complex64 and real ones as float32."""

    def __init__(self, labels, data, device):
        self.labels = {k: torch.as_tensor(v, dtype=torch.float64, device=device) for k, v in labels.items()}
        self.data = {k: torch.as_tensor(v, dtype=torch.complex64 if np.iscomplexobj(v) else torch.float32,
                                        device=device) for k, v in data.items()}

    def __len__(self):
        return next(iter(self.data.values())).shape[0]

    def take(self, index):
        """(labels, data) of the events at `index`."""
        return {k: v[index] for k, v in self.labels.items()}, {k: v[index] for k, v in self.data.items()}

    def epoch(self, batch_size, generator, make_batch):
        """The batches of one epoch in the random order of `generator`: a sized iterable of make_batch(index, generator)."""
        return EpochBatches(self.batches(batch_size, generator), make_batch, generator)

    def batches(self, batch_size, generator):
        """Index tensors of one epoch in the random order of `generator` (the last may be short)."""
        device = next(iter(self.data.values())).device
        order = torch.randperm(len(self), generator=generator, device=generator.device).to(device)
        return torch.split(order, batch_size)
