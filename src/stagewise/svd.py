"""The reduced basis of the whitened signals and its mismatch diagnostics."""

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import layouts, seeds
from .config import Settings
from .files import atomic_path
from .priors import sample_priors

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99, 99.9)

# simulator (a data.StrainSimulator) and trafo (a trafo.Trafo) are typed Any: the layer contract
# keeps this module from importing them.


def whitened_signal_vectors(simulator: Any, trafo: Any, h_plus: torch.Tensor, h_cross: torch.Tensor,
                            generator: torch.Generator) -> torch.Tensor:
    """Unit-norm real vectors (N, D, 2F) of noise-free whitened, standardised signals (with GNPE aligned to
    their proxies, as the network sees them)."""
    extrinsic = sample_priors(simulator.extrinsic_priors, h_plus.shape[0], generator)
    whitened = simulator.whitened_signals(h_plus, h_cross, extrinsic)
    real = torch.view_as_real(whitened).transpose(-1, -2)
    if simulator.gnpe_kernel is not None:
        real = simulator.align(extrinsic, real, generator)[1]
    real = real.to(torch.float64)
    real = (real / trafo.input_std.to(real)).flatten(2)
    return real / torch.linalg.vector_norm(real, dim=-1, keepdim=True)


def fit_basis(vectors: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First `size` right-singular vectors (P, size) of vectors (N, P), and all singular values."""
    if size > min(vectors.shape):
        raise ValueError(f"svd.size {size} exceeds min(num_training_samples, 2F) = {min(vectors.shape)}")
    _, singular_values, vh = torch.linalg.svd(vectors, full_matrices=False)
    return vh[:size].T.contiguous(), singular_values


def mismatch_table(basis: torch.Tensor, vectors: torch.Tensor) -> dict[str, list[float]]:
    """Mismatch 1 - |V_k^T s| of unit vectors s, for truncations k = 1, 2, 4, ..., size.

    Returns {"size": [...], "mean": [...], "max": [...], "p50": [...], ...}."""
    size = basis.shape[1]
    sizes = sorted({min(2**i, size) for i in range(size.bit_length() + 1)})
    coefficients = vectors @ basis
    table: dict[str, list[Any]] = {"size": sizes, "mean": [], "max": []} | {f"p{p}": [] for p in PERCENTILES}
    for k in sizes:
        kept = coefficients[:, :k].square().sum(-1).clamp(max=1.0)
        mismatch = (1 - torch.sqrt(kept)).numpy()
        table["mean"].append(float(mismatch.mean()))
        table["max"].append(float(mismatch.max()))
        for p in PERCENTILES:
            table[f"p{p}"].append(float(np.percentile(mismatch, p)))
    return table


def build_svd(simulator: Any, trafo: Any, h_plus: torch.Tensor, h_cross: torch.Tensor, size: int, num_training: int,
              seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]]:
    """Per-detector bases and mismatch tables: {detector: (basis (2F, K), singular values, table)}.

    The first `num_training` events fit the basis, the rest measure its mismatch."""
    generator = seeds.generator(seed, "build_svd", device=simulator.device)
    vectors = whitened_signal_vectors(simulator, trafo, h_plus, h_cross, generator).cpu()
    results: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]] = {}
    for d, name in enumerate(simulator.detectors.names):
        basis, singular_values = fit_basis(vectors[:num_training, d], size)
        table = mismatch_table(basis, vectors[num_training:, d])
        log.info("%s: mismatch at size %d: mean %.2e, max %.2e", name, size, table["mean"][-1], table["max"][-1])
        results[name] = (basis, singular_values, table)
    return results


def build_observation_svd(trafo: Any, inputs: torch.Tensor, size: int,
                          num_training: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]]:
    """{"inputs": (basis (K, size), singular values, mismatch table)} of standardised observation
    inputs (N, K), the first `num_training` fitting the basis and the rest measuring its mismatch."""
    vectors = trafo.inputs_to_network(inputs.to(torch.float64)).to(torch.float64)
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp_min(1e-30)
    basis, singular_values = fit_basis(vectors[:num_training], size)
    table = mismatch_table(basis, vectors[num_training:])
    log.info("inputs: mismatch at size %d: mean %.2e, max %.2e", size, table["mean"][-1], table["max"][-1])
    return {"inputs": (basis, singular_values, table)}


def save_svd(path: str | Path, detector: str, basis: torch.Tensor, singular_values: torch.Tensor,
             table: dict[str, list[float]], settings: Settings) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        layouts.write_header(f, layouts.SVD, settings)
        f.attrs["detector"] = detector
        f["basis"] = basis.numpy()
        f["singular_values"] = singular_values.numpy()
        for key, values in table.items():
            f[f"mismatch/{key}"] = np.asarray(values)


def load_svd(path: str | Path) -> tuple[np.ndarray, dict[str, list[float]]]:
    """(basis (2F, K) float64 array, mismatch table dict)."""
    with h5py.File(path, "r") as f:
        layouts.check_layout(f, path, layouts.SVD)
        return f["basis"][()], {k: f["mismatch"][k][()].tolist() for k in f["mismatch"]}
