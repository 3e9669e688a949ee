"""The neural posterior estimator: an nflows neural spline flow conditioned on the embedding."""

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from nflows import distributions, flows, transforms
from nflows.nn.nets import ResidualNet
from nflows.utils import create_alternating_binary_mask
from torch import nn
from torch.nn import functional as F

from ..files import read_torch_file
from .embedding import EmbeddingNet

# nflows' LU layers call torch.triangular_solve, which torch deprecates with a long warning at every
# first use; it is nflows' to change, and says nothing to a user.
warnings.filterwarnings("ignore", message="torch.triangular_solve is deprecated", category=UserWarning)


def spline_flow(num_parameters: int, context_dim: int, num_transforms: int, hidden_dim: int, num_blocks: int,
                num_bins: int, tail_bound: float) -> flows.Flow:
    """Coupling rational-quadratic splines with alternating masks, each after an LU layer.

    No random permutations: with them, the couplings can all land on the same parameter
    (likely with 2 parameters), which the data then never informs. A single parameter (GNPE's
    init network) has nothing to couple to: its splines depend on the context alone."""
    steps = []
    for i in range(num_transforms):
        spline: transforms.Transform
        if num_parameters == 1:
            spline = transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                features=1, hidden_features=hidden_dim, context_features=context_dim, num_bins=num_bins,
                tails="linear", tail_bound=tail_bound, num_blocks=num_blocks, use_residual_blocks=True,
                activation=F.elu,
            )
        else:
            spline = transforms.PiecewiseRationalQuadraticCouplingTransform(
                mask=create_alternating_binary_mask(num_parameters, even=i % 2 == 0),
                transform_net_create_fn=lambda n_in, n_out: ResidualNet(
                    n_in, n_out, hidden_dim, context_features=context_dim, num_blocks=num_blocks, activation=F.elu
                ),
                num_bins=num_bins,
                tails="linear",
                tail_bound=tail_bound,
            )
        steps += [transforms.LULinear(num_parameters, identity_init=True), spline]
    steps.append(transforms.LULinear(num_parameters, identity_init=True))
    return flows.Flow(transforms.CompositeTransform(steps), distributions.StandardNormal([num_parameters]))


class PosteriorModel(nn.Module):
    """q(theta | strain, ASD features) in the trafo's network space.

    `architecture` is the dict of constructor arguments, stored in every model file so
    the model can be rebuilt without the config.
    """

    architecture: dict[str, Any]
    embedding: EmbeddingNet
    flow: flows.Flow

    def __init__(self, architecture: Mapping[str, Any]) -> None:
        super().__init__()
        self.architecture = dict(architecture)
        a = self.architecture
        self.embedding = EmbeddingNet(
            a["num_detectors"], a["num_inputs"], a["svd_size"], a["num_asd_features"],
            a["embedding"]["hidden_dims"], a["embedding"]["output_dim"],
        )
        flow = a["flow"]
        self.flow = spline_flow(
            a["num_parameters"], a["embedding"]["output_dim"], flow["num_transforms"], flow["hidden_dim"],
            flow["num_blocks"], flow["num_bins"], flow["tail_bound"],
        )

    def log_prob(self, theta: torch.Tensor, strain: torch.Tensor, asd_features: torch.Tensor) -> torch.Tensor:
        """log q(theta | data) for theta (B, P) in network space; returns (B,)."""
        return self.flow.log_prob(theta, context=self.embedding(strain, asd_features))

    def loss(self, theta: torch.Tensor, strain: torch.Tensor, asd_features: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(theta, strain, asd_features).mean()

    @torch.no_grad()
    def sample(self, strain: torch.Tensor, asd_features: torch.Tensor,
               num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, num_samples, P) draws in network space, with their log q (B, num_samples)."""
        context = self.embedding(strain, asd_features)
        return self.flow.sample_and_log_prob(num_samples, context=context)

    @torch.no_grad()
    def from_noise(self, noise: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws (S, P) in network space from base-distribution noise (S, P), given embedded data `context`
        (1, C) of one event or (S, C), one per draw, with their log q (S,): sample() with the noise drawn by
        the caller."""
        z, log_abs_det = self.flow._transform.inverse(noise, context=context.expand(len(noise), -1))
        return z, self.flow._distribution.log_prob(noise) - log_abs_det


def load_flow_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[PosteriorModel, dict[str, Any]]:
    """(PosteriorModel, the file's dict: settings, stage, history, provenance) from a stage model
    or a checkpoint (.pt)."""
    state = read_torch_file(path, "architecture")
    model = PosteriorModel(state["architecture"])
    model.load_state_dict(state["model"])
    return model.to(device), state
