"""Importance sampling of the network's posterior samples with the exact likelihood and prior,
as Dingo-IS does: weights w = L(d | theta) pi(theta) / q(theta | d).

The weights give the sample efficiency n_eff / n with n_eff = (sum w)^2 / sum w^2, the
evidence Z = mean(w) with the standard error of log Z, sqrt((n - n_eff) / (n n_eff)),
and a reweighted posterior that is exact however imperfect the network is, as long as
q covers the posterior.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import Problem
from ..data import StrainSimulator
from ..priors import Prior, make_priors
from ..simulate.likelihood import log_likelihood, phase_marginalised_log_likelihood

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


def importance_sample(sampler: ImportanceSampler, samples: torch.Tensor, log_q: torch.Tensor,
                      whitened_data: torch.Tensor, asds: torch.Tensor) -> torch.Tensor:
    """log w (N, S) for N injections: samples (N, S, P), log_q (N, S), data and ASDs (N, D, F)."""
    rows = [sampler.log_weights(samples[i], log_q[i], whitened_data[i], asds[i])
            for i in tqdm(range(len(samples)), desc="importance sampling", mininterval=5)]
    return torch.stack(rows)


def summary(log_w: torch.Tensor) -> tuple[float, float, float]:
    """(efficiency n_eff / n, log evidence, its standard error) of one injection's log weights (S,)."""
    n = log_w.numel()
    if not torch.isfinite(log_w).any():
        return 0.0, -math.inf, math.inf
    weights = torch.softmax(log_w, dim=0)
    n_eff = float(1.0 / weights.square().sum())
    log_evidence = float(torch.logsumexp(log_w, dim=0)) - math.log(n)
    return n_eff / n, log_evidence, math.sqrt(max(n - n_eff, 0.0) / (n * n_eff))


def normalised_weights(log_w: torch.Tensor) -> np.ndarray:
    """Weights (N, S) summing to one per injection (all zero where every weight is)."""
    weights = torch.softmax(log_w, dim=1)
    return torch.nan_to_num(weights, nan=0.0).numpy()


def efficiency_quantiles(efficiencies: np.ndarray | Sequence[float]) -> dict[str, float]:
    """{efficiency_median, efficiency_q16, efficiency_q84} as fractions."""
    q16, median, q84 = np.quantile(efficiencies, [0.16, 0.5, 0.84])
    return {"efficiency_median": float(median), "efficiency_q16": float(q16), "efficiency_q84": float(q84)}
