"""Importance sampling of the network's posterior samples with the exact likelihood and prior,
as Dingo-IS does: weights w = L(d | theta) pi(theta) / q(theta | d).

The weights give the sample efficiency n_eff / n with n_eff = (sum w)^2 / sum w^2, the
evidence Z = mean(w) with the standard error of log Z, sqrt((n - n_eff) / (n n_eff)),
and a reweighted posterior that is exact however imperfect the network is, as long as
q covers the posterior.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from ..config import Problem
from ..data import StrainSimulator
from ..priors import Prior, make_priors
from ..simulate.likelihood import log_likelihood, phase_marginalised_log_likelihood

B = TypeVar("B")
LIKELIHOOD_PARAMETERS = ("f0", "tau", "snr", "phase", "time")


def likelihood_plan(problem: Problem) -> tuple[dict[str, str | float] | None, str | None]:
    """How each parameter of the ringdown likelihood is handled: ({name: "inferred" |
    "marginalised" | fixed value}, None), or (None, the reason importance sampling cannot run)."""
    if not problem.simulated:
        return None, "the event files are the user's own: stagewise knows no likelihood for them"
    plan: dict[str, str | float] = {}
    for name in LIKELIHOOD_PARAMETERS:
        spec = problem.priors.get(name)
        if name in problem.inference_parameters:
            plan[name] = "inferred"
        elif spec is None:
            return None, f"the ringdown likelihood needs a prior for '{name}'"
        elif spec["distribution"] == "fixed":
            plan[name] = float(spec["value"])
        elif name == "phase" and spec["distribution"] == "uniform" and math.isclose(
                spec["high"] - spec["low"], 2 * math.pi):
            plan[name] = "marginalised"
        else:
            return None, (f"'{name}' is neither inferred nor fixed, and only a phase uniform over "
                          "a full period can be marginalised")
    return plan, None


class ImportanceSampler:
    """log w of posterior samples for one injection's whitened data and ASD."""

    names: list[str]  # the inference parameters, the columns of the samples
    plan: dict[str, Any]  # likelihood_plan's: {name: "inferred" | "marginalised" | fixed value}
    simulator: StrainSimulator
    priors: dict[str, Prior]

    def __init__(self, problem: Problem, plan: dict[str, Any], simulator: StrainSimulator) -> None:
        self.names = list(problem.inference_parameters)
        self.plan = plan
        self.simulator = simulator
        self.priors = make_priors({name: problem.priors[name] for name in self.names})

    def log_prior(self, samples: torch.Tensor) -> torch.Tensor:
        """log pi of samples float64 (S, P) in physical values: (S,), -inf outside the prior."""
        log_prior = sum(self.priors[name].log_prob(samples[:, i]) for i, name in enumerate(self.names))
        assert isinstance(log_prior, torch.Tensor)  # a sum of tensors: there is at least one inference parameter
        return log_prior

    def log_likelihood(self, samples: torch.Tensor, whitened_data: torch.Tensor, asd: torch.Tensor) -> torch.Tensor:
        """log L of whitened data complex (D, F) measured with `asd` (D, F) at samples (S, P) inside the
        prior (with the phase marginalised or fixed as the plan says): float64 (S,)."""
        columns = {name: samples[:, i] for i, name in enumerate(self.names)}
        parameters = {
            name: columns[name] if how == "inferred" else torch.full((len(samples),), how, dtype=torch.float64)
            for name, how in self.plan.items() if how != "marginalised"
        }
        if self.plan["phase"] == "marginalised":
            return phase_marginalised_log_likelihood(whitened_data, parameters, self.simulator, asd).cpu()
        return log_likelihood(whitened_data, parameters, self.simulator, asd).cpu()

    def log_weights(self, samples: torch.Tensor, log_q: torch.Tensor, whitened_data: torch.Tensor,
                    asd: torch.Tensor) -> torch.Tensor:
        """samples: float64 (S, P) physical values; log_q: (S,) network density in physical
        space; whitened_data: complex (D, F); asd: (D, F). Returns float64 (S,), -inf outside the prior."""
        log_prior = self.log_prior(samples)
        inside = torch.isfinite(log_prior)
        log_w = torch.full_like(log_prior, -math.inf)
        log_w[inside] = self.log_likelihood(samples[inside], whitened_data, asd) + log_prior[inside] - log_q[inside]
        return log_w


@dataclass(frozen=True)
class SampleBudget:
    """How many samples importance sampling draws per event: batches of num_samples until the effective
    number of all drawn reaches effective_samples (None: one batch), at most max_samples."""

    num_samples: int = 2000
    effective_samples: int | None = None
    max_samples: int | None = None

    @property
    def max_batches(self) -> int:
        if self.effective_samples is None or self.max_samples is None:
            return 1
        return max(1, self.max_samples // self.num_samples)

    @property
    def width(self) -> int:
        """The most samples an event can have."""
        return self.max_batches * self.num_samples


class Exact(NamedTuple):
    """One event's importance-weighted samples: the exact posterior where the network covers it."""

    samples: np.ndarray  # (n, P) physical values
    weights: np.ndarray  # (n,) summing to one (all zero when every weight is)


def effective_samples(log_w: torch.Tensor) -> float:
    """Kish's effective number (sum w)^2 / sum w^2 of log weights (n,); 0 when every weight is 0."""
    if not torch.isfinite(log_w).any():
        return 0.0
    return float(1.0 / torch.softmax(log_w, dim=0).square().sum())


def weigh_until(batches: Iterable[B], log_weights: Callable[[B], torch.Tensor],
                budget: SampleBudget) -> tuple[list[B], torch.Tensor]:
    """(the batches weighed, the log weights of all of them (n,)): weigh one batch after the other until
    the effective number of all reaches budget.effective_samples, or budget.max_batches are drawn. The
    efficiency is then that of every sample drawn, not of a first batch alone (a small one overestimates it)."""
    drawn, log_w = [], []
    for count, batch in enumerate(batches, start=1):
        drawn.append(batch)
        log_w.append(log_weights(batch))
        target = budget.effective_samples
        if target is None or count >= budget.max_batches or effective_samples(torch.cat(log_w)) >= target:
            break
    return drawn, torch.cat(log_w)


def summary(log_w: torch.Tensor) -> tuple[float, float, float]:
    """(efficiency n_eff / n, log evidence, its standard error) of one injection's log weights (S,)."""
    n, n_eff = log_w.numel(), effective_samples(log_w)
    if n_eff == 0:
        return 0.0, -math.inf, math.inf
    log_evidence = float(torch.logsumexp(log_w, dim=0)) - math.log(n)
    return n_eff / n, log_evidence, math.sqrt(max(n - n_eff, 0.0) / (n * n_eff))


def normalised_weights(log_w: torch.Tensor) -> np.ndarray:
    """Weights (n,) summing to one (all zero where every weight is)."""
    weights = torch.softmax(log_w, dim=0)
    return torch.nan_to_num(weights, nan=0.0).numpy()


def efficiency_quantiles(efficiencies: np.ndarray | Sequence[float]) -> dict[str, float]:
    """{efficiency_median, efficiency_q16, efficiency_q84} as fractions."""
    q16, median, q84 = np.quantile(efficiencies, [0.16, 0.5, 0.84])
    return {"efficiency_median": float(median), "efficiency_q16": float(q16), "efficiency_q84": float(q84)}
