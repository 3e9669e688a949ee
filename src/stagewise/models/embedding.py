"""Embedding network with a first layer seeded by the SVD bases (Dingo's reduced-basis layer)."""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class ResidualBlock(nn.Module):
    """x -> skip(x) + W2 elu(W1 elu(x)), with a linear skip when the width changes."""

    inner: nn.Linear
    outer: nn.Linear
    skip: nn.Identity | nn.Linear

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.inner = nn.Linear(dim_in, dim_out)
        self.outer = nn.Linear(dim_out, dim_out)
        self.skip = nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.outer(F.elu(self.inner(F.elu(x))))


class EmbeddingNet(nn.Module):
    """Whitened strain (B, D, 2, F) and ASD features (B, A) -> context (B, output_dim).

    The first layer projects each detector's 2F real inputs onto K basis vectors;
    seed it with `seed_svd` and freeze it with `freeze_svd`. Its outputs are divided
    by a fixed per-coefficient scale (`projection_scale`, set from data) before the
    residual network.
    """

    svd_weight: nn.Parameter  # (D, K, num_inputs)
    projection_scale: torch.Tensor  # (D * K,), a buffer
    blocks: nn.Sequential
    output: nn.Linear

    def __init__(self, num_detectors: int, num_inputs: int, svd_size: int, num_asd_features: int,
                 hidden_dims: Sequence[int], output_dim: int) -> None:
        super().__init__()
        self.svd_weight = nn.Parameter(torch.randn(num_detectors, svd_size, num_inputs) / num_inputs**0.5)
        self.register_buffer("projection_scale", torch.ones(num_detectors * svd_size))
        widths = [num_detectors * svd_size + num_asd_features, *hidden_dims]
        self.blocks = nn.Sequential(*(ResidualBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)))
        self.output = nn.Linear(widths[-1], output_dim)

    def project(self, strain: torch.Tensor) -> torch.Tensor:
        """(B, D, 2, F) -> SVD coefficients (B, D * K), unscaled."""
        return torch.einsum("bdi,dki->bdk", strain.flatten(2), self.svd_weight).flatten(1)

    def forward(self, strain: torch.Tensor, asd_features: torch.Tensor) -> torch.Tensor:
        coefficients = self.project(strain) / self.projection_scale
        return self.output(F.elu(self.blocks(torch.cat((coefficients, asd_features), dim=1))))

    def seed_svd(self, bases: Sequence[np.ndarray | torch.Tensor]) -> None:
        """Set the first layer from per-detector bases, each (2F, K) with orthonormal columns."""
        with torch.no_grad():
            self.svd_weight.copy_(torch.stack([torch.as_tensor(b).T for b in bases]))

    def freeze_svd(self, frozen: bool) -> None:
        self.svd_weight.requires_grad_(not frozen)
