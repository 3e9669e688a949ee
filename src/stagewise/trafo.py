"""The transformation model: standardisation of labels (optionally of their log) and of inputs."""

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from numpy.typing import ArrayLike
from tqdm import tqdm

from . import layouts, seeds
from .config import Settings
from .events import OBSERVATION_DATASET, SIGNAL_DATASETS, iter_chunks
from .files import atomic_path

log = logging.getLogger(__name__)


class Trafo:
    """Label standardisation z = (g(x) - mean) / std, g = log or identity, and input
    standardisation (g(x) - mean) / std per input feature (log only where `log_inputs`)."""

    names: list[str]  # the labels, in the order of the network's P parameters
    label_mean: torch.Tensor  # float64 (P,)
    label_std: torch.Tensor  # float64 (P,)
    log_labels: torch.Tensor  # bool (P,)
    input_mean: torch.Tensor  # float32, the shape of one event's inputs
    input_std: torch.Tensor  # float32, as input_mean
    log_inputs: torch.Tensor  # bool, as input_mean

    def __init__(self, names: Iterable[str], label_mean: torch.Tensor | ArrayLike, label_std: torch.Tensor | ArrayLike,
                 log_labels: torch.Tensor | ArrayLike, input_mean: torch.Tensor | ArrayLike,
                 input_std: torch.Tensor | ArrayLike, log_inputs: torch.Tensor | ArrayLike | None = None) -> None:
        self.names = list(names)
        self.label_mean = torch.as_tensor(label_mean, dtype=torch.float64)
        self.label_std = torch.as_tensor(label_std, dtype=torch.float64)
        self.log_labels = torch.as_tensor(log_labels, dtype=torch.bool)
        self.input_mean = torch.as_tensor(input_mean, dtype=torch.float32)
        self.input_std = torch.as_tensor(input_std, dtype=torch.float32)
        self.log_inputs = (torch.zeros_like(self.input_mean, dtype=torch.bool) if log_inputs is None
                           else torch.as_tensor(log_inputs, dtype=torch.bool))
        self._any_log_input = bool(self.log_inputs.any())  # decided once, not per batch

    def labels_to_network(self, parameters: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: float64 (B,)} -> float32 (B, P) in network space."""
        x = torch.stack([parameters[n].to(torch.float64) for n in self.names], dim=-1)
        mean, std, logs = (t.to(x.device) for t in (self.label_mean, self.label_std, self.log_labels))
        x = torch.where(logs, torch.log(x.clamp_min(1e-300)), x)
        return ((x - mean) / std).to(torch.float32)

    def labels_from_network(self, z: torch.Tensor) -> torch.Tensor:
        """float (..., P) in network space -> float64 (..., P) physical values."""
        mean, std, logs = (t.to(z.device) for t in (self.label_mean, self.label_std, self.log_labels))
        x = z.to(torch.float64) * std + mean
        return torch.where(logs, torch.exp(x), x)

    def log_abs_det_jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """log |d z / d x| of labels_to_network at network-space z (..., P): for densities."""
        std, logs = self.label_std.to(z.device), self.log_labels.to(z.device)
        x = self.labels_from_network(z)
        per_label = -torch.log(std) - torch.where(logs, torch.log(x), torch.zeros_like(x))
        return per_label.sum(-1)

    def physical_draws(self, z: torch.Tensor, log_q_network: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws in network space (..., P) with their log q as physical float64 samples with log q in physical
        units, on the CPU (where the likelihood and the files take them)."""
        return self.labels_from_network(z).cpu(), (log_q_network.to(torch.float64) + self.log_abs_det_jacobian(z)).cpu()

    def inputs_to_network(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs (B, ...) as the network sees them, float32."""
        if self._any_log_input:
            logs = self.log_inputs.to(inputs.device)
            inputs = torch.where(logs, torch.log(inputs.clamp_min(1e-30)), inputs)
        return ((inputs - self.input_mean.to(inputs.device)) / self.input_std.to(inputs.device)).to(torch.float32)

    FIELDS = ("label_mean", "label_std", "log_labels", "input_mean", "input_std", "log_inputs")

    def to_dict(self) -> dict[str, Any]:
        """The trafo as plain data (names and tensors), as a model file carries it."""
        return {"names": list(self.names), **{k: getattr(self, k).clone() for k in self.FIELDS}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Trafo":
        """The inverse of to_dict; tensors may come as nested lists."""
        return cls(values["names"], *(values[k] for k in cls.FIELDS))

    def save(self, path: str | Path, settings: Settings) -> None:
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            layouts.write_header(f, layouts.TRAFO, settings)
            f["labels/names"] = np.array(self.names, dtype=h5py.string_dtype())
            f["labels/mean"] = self.label_mean.numpy()
            f["labels/std"] = self.label_std.numpy()
            f["labels/log"] = self.log_labels.numpy()
            f["inputs/mean"] = self.input_mean.numpy()
            f["inputs/std"] = self.input_std.numpy()
            f["inputs/log"] = self.log_inputs.numpy()

    @classmethod
    def load(cls, path: str | Path) -> "Trafo":
        with h5py.File(path, "r") as f:
            layouts.check_layout(f, path, layouts.TRAFO)
            return cls(
                [n.decode() if isinstance(n, bytes) else n for n in f["labels/names"][()]],
                f["labels/mean"][()], f["labels/std"][()], f["labels/log"][()],
                f["inputs/mean"][()], f["inputs/std"][()], f["inputs/log"][()] if "log" in f["inputs"] else None,
            )


def fit_trafo(batches: Iterable[tuple[Mapping[str, torch.Tensor | np.ndarray], torch.Tensor | np.ndarray]],
              parameters: Sequence[str], log_labels: Sequence[str], standardize_inputs: bool = True,
              log_inputs: Sequence[int] = ()) -> Trafo:
    """Fit a Trafo streaming over `batches`, an iterable of (labels {name: float64 (B,)}, inputs (B, ...)).

    log_labels: parameters standardised in log space; log_inputs: indices of input features
    (along the last axis) standardised in log space."""
    logs = torch.tensor([p in log_labels for p in parameters])
    sums: dict[str, Any]  # float 0.0, then float64 tensors
    input_logs: torch.Tensor | None
    sums, n, input_logs = {"label": 0.0, "label_sq": 0.0, "input": 0.0, "input_sq": 0.0}, 0, None
    for labels, inputs in batches:
        x = torch.stack([torch.as_tensor(labels[p]).to(torch.float64) for p in parameters], dim=-1).cpu()
        bad = logs & (x <= 0).any(0)
        if bad.any():
            not_positive = [p for p, b in zip(parameters, bad, strict=True) if b]
            raise ValueError(f"trafo.log_labels: {not_positive} have values <= 0")
        inputs = torch.as_tensor(inputs).to(torch.float64).cpu()
        if input_logs is None:
            input_logs = log_input_mask(inputs.shape[1:], log_inputs)
        if log_inputs:  # two passes over the inputs that only log inputs need
            if (input_logs & (inputs <= 0)).any():
                features = sorted({int(i) for i in torch.nonzero(input_logs & (inputs <= 0))[:, -1]})
                raise ValueError(f"trafo.log_inputs: input feature(s) {features} have values <= 0")
            inputs = torch.where(input_logs, torch.log(inputs.clamp_min(1e-300)), inputs)
        x = torch.where(logs, torch.log(x), x)
        sums["label"] += x.sum(0)
        sums["label_sq"] += x.square().sum(0)
        sums["input"] += inputs.sum(0)
        sums["input_sq"] += inputs.square().sum(0)
        n += len(x)
    label_mean = sums["label"] / n
    label_std = torch.sqrt(sums["label_sq"] / n - label_mean.square())
    input_mean = sums["input"] / n
    input_std = torch.sqrt((sums["input_sq"] / n - input_mean.square()).clamp_min(0))
    if not standardize_inputs:
        input_mean, input_std = torch.zeros_like(input_mean), torch.ones_like(input_std)
    elif not (input_std > 0).all():
        constant = torch.nonzero(~(input_std > 0)).flatten().tolist()[:10]
        log.warning("input features %s do not vary in the trafo data: left unscaled", constant)
        input_std = torch.where(input_std > 0, input_std, torch.ones_like(input_std))
    zero = [p for p, s in zip(parameters, label_std, strict=True) if not s > 0]
    if zero:
        raise ValueError(f"inference parameters {zero} do not vary in the trafo data: fix them or drop them")
    log.info("label means %s, stds %s", label_mean.tolist(), label_std.tolist())
    return Trafo(parameters, label_mean, label_std, logs, input_mean, input_std, input_logs)


def log_input_mask(shape: Sequence[int], log_inputs: Sequence[int]) -> torch.Tensor:
    """Boolean mask of `shape` that is True for the features (last axis) listed in log_inputs."""
    width = shape[-1]
    out_of_range = [i for i in log_inputs if not 0 <= i < width]
    if out_of_range:
        raise ValueError(f"trafo.log_inputs: feature indices {out_of_range} outside 0..{width - 1}")
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[..., list(log_inputs)] = True
    return mask


def signal_batches(
    paths: Sequence[str | Path], label_names: Sequence[str], simulator: Any, num_batches: int, batch_size: int,
    seed: int,
) -> Iterator[tuple[Mapping[str, torch.Tensor | np.ndarray], torch.Tensor | np.ndarray]]:
    """Trafo batches of signals plus noise: labels from the files (`label_names`),
    extrinsic ones and noise from `simulator` (a data.StrainSimulator, fiducial ASD), as in training."""
    generator = seeds.generator(seed, "fit_trafo", device=simulator.device)
    chunks = iter_chunks(paths, label_names, SIGNAL_DATASETS, batch_size, num_batches)
    for labels, data in tqdm(chunks, total=num_batches, desc="fit_trafo", mininterval=2):
        h_plus, h_cross = (torch.as_tensor(data[k], device=simulator.device) for k in SIGNAL_DATASETS)
        values, inputs, _ = simulator(h_plus, h_cross, labels, generator)
        yield values, inputs


def observation_batches(
    paths: Sequence[str | Path], names: Sequence[str], num_batches: int, batch_size: int,
) -> Iterator[tuple[Mapping[str, torch.Tensor | np.ndarray], torch.Tensor | np.ndarray]]:
    """Trafo batches of ready observations, read in contiguous chunks."""
    chunks = iter_chunks(paths, names, (OBSERVATION_DATASET,), batch_size, num_batches)
    for labels, data in tqdm(chunks, total=num_batches, desc="fit_trafo", mininterval=2):
        yield labels, data[OBSERVATION_DATASET]
