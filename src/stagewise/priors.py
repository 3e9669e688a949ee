"""One-dimensional priors: uniform, loguniform and fixed, sampled with a seeded torch generator.

torch is imported by the methods that use it: checking a config's priors (at every snakemake
start) stays free of it."""

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch  # for the annotations only (quoted): importing this module stays free of torch


class Prior:
    """A prior of one parameter, built from its config entry `{distribution, low, high}`
    or `{distribution: fixed, value}`."""

    name: str
    distribution: str  # "uniform", "loguniform" or "fixed"
    low: float
    high: float  # equal to low for a fixed prior

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.distribution = spec["distribution"]
        if self.distribution == "fixed":
            self.low = self.high = float(spec["value"])
        else:
            self.low, self.high = float(spec["low"]), float(spec["high"])
            if not self.low < self.high:
                raise ValueError(f"prior {name}: low ({self.low}) must be below high ({self.high})")
            if self.distribution == "loguniform" and self.low <= 0:
                raise ValueError(f"prior {name}: loguniform needs low > 0, got {self.low}")

    def sample(self, n: int, generator: "torch.Generator") -> "torch.Tensor":
        """n float64 draws."""
        import torch

        if self.distribution == "fixed":
            return torch.full((n,), self.low, dtype=torch.float64, device=generator.device)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
        if self.distribution == "uniform":
            return self.low + (self.high - self.low) * u
        return torch.exp(math.log(self.low) + (math.log(self.high) - math.log(self.low)) * u)

    def log_prob(self, x: "torch.Tensor") -> "torch.Tensor":
        """Log density at x (float64 tensor); -inf outside the support."""
        import torch

        inside = (x >= self.low) & (x <= self.high)
        if self.distribution == "uniform":
            density = torch.full_like(x, -math.log(self.high - self.low))
        elif self.distribution == "loguniform":
            density = -torch.log(x.clamp_min(self.low)) - math.log(math.log(self.high / self.low))
        else:
            density = torch.zeros_like(x)
        return torch.where(inside, density, torch.full_like(x, -math.inf))

    def mean(self) -> float:
        """Mean of the prior."""
        if self.distribution == "loguniform":
            return (self.high - self.low) / math.log(self.high / self.low)
        return (self.low + self.high) / 2

    def std(self) -> float:
        """Standard deviation of the prior."""
        if self.distribution == "fixed":
            return 0.0
        if self.distribution == "uniform":
            return (self.high - self.low) / math.sqrt(12)
        second = (self.high**2 - self.low**2) / (2 * math.log(self.high / self.low))
        return math.sqrt(second - self.mean() ** 2)


def make_priors(specs: dict[str, dict[str, Any]]) -> dict[str, Prior]:
    """{name: Prior} from a config section `{name: spec}`."""
    return {name: Prior(name, spec) for name, spec in specs.items()}


def sample_priors(priors: dict[str, Prior], n: int, generator: "torch.Generator") -> "dict[str, torch.Tensor]":
    """{name: float64 tensor (n,)}, drawn in the order of `priors`."""
    return {name: prior.sample(n, generator) for name, prior in priors.items()}
