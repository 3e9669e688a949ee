"""GNPE sampling of a free arrival time, as Dingo does it, with the number of Gibbs iterations chosen
per event; and the proxy density that makes its samples importance-weightable.

The network infers the parameters from data moved by -t_hat, with the time as the offset t - t_hat
from a proxy t_hat (data.StrainSimulator.align). Gibbs sampling runs S chains: they start from the
init network's times blurred by the kernel into proxies; each iteration moves every chain's data by
-t_hat, draws theta, sets t = t_hat + offset and blurs t into a new proxy. The iterations stop when
two successive proxy sets no longer differ detectably, the p-value of their two-sample
Kolmogorov-Smirnov statistic being at least `ks_pvalue` (after at least `min` iterations), or at
`max` (Dingo runs a fixed 30 and only prints the statistic). A p-value rather than the statistic
makes the rule independent of the number of chains.

The density of Gibbs samples is unknown. For importance sampling, an unconditional density r (a
Gaussian kernel density estimate) is fitted to the converged proxies, and further passes (batches) draw
t_hat ~ r and theta ~ q(theta | d, t_hat): log q = log r(t_hat) + log q(offset, ... | moved data),
and the kernel's log density of t_hat - t is the target's extra term (delta_log_prob_target, -inf
outside the kernel), so that log w = log prior + log L + delta - log q.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from scipy import special

from ..data import shift_time
from ..models.posterior import PosteriorModel
from ..trafo import Trafo

SAMPLE_BLOCK = 4096  # chains per pass through the network: fixed, so that results never depend on it
DENSITY_POINTS = 4096  # proxies the density estimate is fitted to, at most
EDGE = 0.95  # offsets beyond EDGE x kernel count as near the kernel's edge (5 % of a calibrated posterior's)


@dataclass(frozen=True)
class GibbsSettings:
    """Bounds of the Gibbs iterations (config gnpe.iterations)."""

    min: int = 2
    max: int = 30
    ks_pvalue: float = 0.5  # converged when successive proxy sets are this compatible


class Gibbs(NamedTuple):
    """One event's Gibbs samples."""

    samples: torch.Tensor  # float64 (S, P), physical, the time as measured
    offsets: torch.Tensor  # float64 (S,) t - t_hat of the last iteration
    proxies: torch.Tensor  # float64 (S,) the converged proxies: the last times blurred by the kernel
    iterations: int
    ks_pvalue: float  # of the last iteration's two successive proxy sets


class Draw(NamedTuple):
    """One event's importance-sampling pass."""

    samples: torch.Tensor  # float64 (S, P), physical, the time as measured
    log_prob: torch.Tensor  # float64 (S,) log r(t_hat) + log q(theta | d, t_hat), physical units
    delta_log_prob_target: torch.Tensor  # float64 (S,) log kernel(t_hat - t)
    proxies: torch.Tensor  # float64 (S,) t_hat


def ks_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """The asymptotic p-value of the two-sample Kolmogorov-Smirnov statistic (the largest distance of the
    empirical CDFs) of samples a and b."""
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    statistic = float((cdf_a - cdf_b).abs().max())
    return float(special.kolmogorov(math.sqrt(len(a) * len(b) / (len(a) + len(b))) * statistic))


class ProxyDensity:
    """A Gaussian kernel density estimate of proxies, normalised, with sampling. Silverman's bandwidth,
    0.9 min(std, IQR / 1.34) n^(-1/5): a few chains stranded far away do not widen it."""

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points[:DENSITY_POINTS].to(torch.float64)
        q25, q75 = torch.quantile(self.points, torch.tensor([0.25, 0.75], dtype=torch.float64,
                                                            device=self.points.device))
        scale = min(float(self.points.std()), float(q75 - q25) / 1.34)
        self.bandwidth = 0.9 * scale * len(self.points) ** -0.2

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(len(self.points), (n,), generator=generator, device=self.points.device)
        noise = torch.randn(n, generator=generator, dtype=torch.float64, device=self.points.device)
        return self.points[pick] + self.bandwidth * noise

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for block in x.split(SAMPLE_BLOCK):
            z = (block[:, None] - self.points[None]) / self.bandwidth
            out.append(torch.logsumexp(-0.5 * z.square(), dim=1))
        norm = math.log(len(self.points) * self.bandwidth * math.sqrt(2 * math.pi))
        return torch.cat(out) - norm


class GNPESampler:
    """The Gibbs sampler and the importance-sampling pass of one model: its network and trafo (the time
    label an offset from the proxy) and the init network with its own trafo."""

    def __init__(self, network: PosteriorModel, trafo: Trafo, init_network: PosteriorModel, init_trafo: Trafo,
                 kernel: float, frequencies: torch.Tensor, settings: GibbsSettings) -> None:
        self.network, self.trafo, self.init_network, self.init_trafo = network, trafo, init_network, init_trafo
        self.kernel, self.settings = kernel, settings
        self.frequencies = frequencies
        self.time = trafo.names.index("time")

    @classmethod
    def from_bundle(cls, network: PosteriorModel, trafo: Trafo, gnpe: Mapping[str, Any], frequencies: torch.Tensor,
                    settings: GibbsSettings) -> "GNPESampler":
        """The sampler of a model file whose inference bundle carries `gnpe` (training.stage.gnpe_bundle)."""
        device = frequencies.device
        init = gnpe["init"]
        init_network = PosteriorModel(init["architecture"])
        init_network.load_state_dict(init["model"])
        init_network.to(device).eval()
        return cls(network, trafo, init_network, Trafo.from_dict(init["trafo"]), float(gnpe["kernel"]),
                   frequencies, settings)

    @staticmethod
    def measured(whitened: torch.Tensor) -> torch.Tensor:
        """Whitened data complex (D, F) as network inputs before standardisation: float32 (1, D, 2, F)."""
        return torch.view_as_real(whitened.to(torch.complex64)).transpose(-1, -2)[None]

    def blur(self, times: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        eps = torch.rand(len(times), generator=generator, dtype=torch.float64, device=times.device)
        return times + self.kernel * (2 * eps - 1)

    @torch.no_grad()
    def initial_times(self, whitened: torch.Tensor, features: torch.Tensor, num_samples: int,
                      generator: torch.Generator) -> torch.Tensor:
        """Arrival times float64 (S,) drawn from the init network, which sees the data as measured."""
        inputs = self.init_trafo.inputs_to_network(self.measured(whitened))
        context = self.init_network.embedding(inputs, features)
        noise = torch.randn(num_samples, 1, generator=generator, device=context.device)
        z, _ = self.init_network.from_noise(noise, context)
        return self.init_trafo.labels_from_network(z)[:, 0]

    @torch.no_grad()
    def conditional(self, whitened: torch.Tensor, features: torch.Tensor, proxies: torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """theta ~ q(theta | data moved by -t_hat) for every proxy t_hat (S,): (physical samples float64 (S, P)
        with the time as measured, log q in physical units (S,))."""
        noise = torch.randn(len(proxies), len(self.trafo.names), generator=generator, device=proxies.device)
        measured = self.measured(whitened)
        samples, log_q = [], []
        for block_noise, block_proxies in zip(noise.split(SAMPLE_BLOCK), proxies.split(SAMPLE_BLOCK), strict=True):
            moved = shift_time(measured.expand(len(block_proxies), -1, -1, -1), -block_proxies, self.frequencies)
            context = self.network.embedding(self.trafo.inputs_to_network(moved), features.expand(len(moved), -1))
            z, log_q_network = self.network.from_noise(block_noise, context)
            theta = self.trafo.labels_from_network(z)
            theta[:, self.time] += block_proxies
            samples.append(theta)
            log_q.append(log_q_network.to(torch.float64) + self.trafo.log_abs_det_jacobian(z))
        return torch.cat(samples), torch.cat(log_q)

    def gibbs(self, whitened: torch.Tensor, features: torch.Tensor, num_samples: int,
              generator: torch.Generator) -> Gibbs:
        """S = num_samples chains of one event's whitened data (D, F) and ASD features (1, A)."""
        proxies = self.blur(self.initial_times(whitened, features, num_samples, generator).to(torch.float64),
                            generator)
        iteration = 0
        while True:
            iteration += 1
            samples, _ = self.conditional(whitened, features, proxies, generator)
            offsets = samples[:, self.time] - proxies
            new = self.blur(samples[:, self.time], generator)
            pvalue = ks_pvalue(proxies, new)
            proxies = new
            converged = iteration >= self.settings.min and pvalue >= self.settings.ks_pvalue
            if converged or iteration >= self.settings.max:
                return Gibbs(samples, offsets, proxies, iteration, pvalue)

    def importance_draw(self, whitened: torch.Tensor, features: torch.Tensor, density: ProxyDensity,
                        num_samples: int, generator: torch.Generator) -> Draw:
        """One pass with proxies drawn from `density`, fitted to converged proxies (ProxyDensity(gibbs.proxies))."""
        drawn = density.sample(num_samples, generator)
        samples, log_q = self.conditional(whitened, features, drawn, generator)
        offsets = samples[:, self.time] - drawn
        delta = torch.where(offsets.abs() <= self.kernel, torch.full_like(offsets, -math.log(2 * self.kernel)),
                            torch.full_like(offsets, -math.inf))
        return Draw(samples, density.log_prob(drawn) + log_q, delta, drawn)

    def edge_fractions(self, offsets: torch.Tensor) -> dict[str, float]:
        """Of the offsets t - t_hat: the fraction outside the kernel (0 for a network that learned the
        kernel), and the fraction beyond EDGE x its half-width (1 - EDGE when calibrated)."""
        size = offsets.abs() / self.kernel
        return {"outside_kernel_fraction": float((size > 1).double().mean()),
                "edge_fraction": float((size > EDGE).double().mean())}
