"""Embedding network with a first layer seeded by the SVD bases (Dingo's reduced-basis layer)."""

import torch
from torch import nn
from torch.nn import functional as F


class ResidualBlock(nn.Module):
    """x -> skip(x) + W2 elu(W1 elu(x)), with a linear skip when the width changes."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.inner = nn.Linear(dim_in, dim_out)
        self.outer = nn.Linear(dim_out, dim_out)
        self.skip = nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x):
        return self.skip(x) + self.outer(F.elu(self.inner(F.elu(x))))


class EmbeddingNet(nn.Module):
    """Whitened strain (B, D, 2, F) and ASD features (B, A) -> context (B, output_dim).

    The first layer projects each detector's 2F real inputs onto K basis vectors;
    seed it with `seed_svd` and freeze it with `freeze_svd`. Its outputs are divided
    by a fixed per-coefficient scale (`projection_scale`, set from data) before the
    residual network.
    """

    def __init__(self, num_detectors, num_inputs, svd_size, num_asd_features, hidden_dims, output_dim):
        super().__init__()
        self.svd_weight = nn.Parameter(torch.randn(num_detectors, svd_size, num_inputs) / num_inputs**0.5)
        self.register_buffer("projection_scale", torch.ones(num_detectors * svd_size))
        widths = [num_detectors * svd_size + num_asd_features, *hidden_dims]
        self.blocks = nn.Sequential(*(ResidualBlock(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.output = nn.Linear(widths[-1], output_dim)

    def project(self, strain):
        """(B, D, 2, F) -> SVD coefficients (B, D * K), unscaled."""
        return torch.einsum("bdi,dki->bdk", strain.flatten(2), self.svd_weight).flatten(1)

    def forward(self, strain, asd_features):
        coefficients = self.project(strain) / self.projection_scale
        return self.output(F.elu(self.blocks(torch.cat((coefficients, asd_features), dim=1))))

    def seed_svd(self, bases):
        """Set the first layer from per-detector bases, each (2F, K) with orthonormal columns."""
        with torch.no_grad():
            self.svd_weight.copy_(torch.stack([torch.as_tensor(b).T for b in bases]))

    def freeze_svd(self, frozen):
        self.svd_weight.requires_grad_(not frozen)
