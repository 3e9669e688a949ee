"""The infer step: posteriors (flow) or predictions (gaussian_regression) of observed events, from
one stage model file and observed-data files (observed.py), with nothing else.

The model file carries its inference bundle (sources.inference_bundle): the problem, the trafo,
the frequency grid and the fiducial ASD. Each event is processed on its own: its base-distribution
draws come from a generator seeded by (the run's seed, its event_id), its data are embedded alone
and its samples go through the flow in blocks of a fixed size, so the output does not depend on the
batch of events, on how the events are split into files, or on their order. Memory is bounded by
`events_per_batch` events and one event's samples.

posterior.h5 (layout "posterior/1")::

    /event_id                (N,)
    /samples/<parameter>     (N, S) physical values      flow only
    /samples/log_prob        (N, S) log q in physical units (GNPE: log r(t_hat) + log q; NaN without
                                                          importance sampling, where Gibbs samples have no density)
    /samples/log_prior, log_likelihood, weights (N, S)    with importance sampling: weights have mean 1,
                                                          0 outside the prior (log_likelihood NaN there)
    /samples/time_proxy, delta_log_prob_target (N, S)     GNPE: the proxy t_hat and log kernel(t_hat - t)
    /events/<column>         (N,) n_eff, efficiency, log_evidence, log_evidence_std, log_noise_evidence,
                             log_bayes_factor             with importance sampling
    /events/gnpe_iterations, gnpe_ks_pvalue, outside_kernel_fraction, edge_fraction (N,)   GNPE
    /predictions/<label>, <label>_uncertainty  (N,)      gaussian_regression
    /labels/<name>           (N,) the truth, when the observed files hold it
"""

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import layouts, seeds
from .config import Settings
from .evaluate import plots
from .evaluate.gnpe import GibbsSettings, GNPESampler
from .evaluate.importance import ImportanceSampler, likelihood_plan, summary
from .files import atomic_path, read_torch_file
from .models.posterior import PosteriorModel
from .observed import ObservedFile
from .simulate.likelihood import noise_log_likelihood
from .sources import Bundle

log = logging.getLogger(__name__)
SAMPLE_BLOCK = 4096  # samples per pass through the flow and the likelihood: fixed, so that results never depend on it
QUANTILES = {"q05": 0.05, "median": 0.5, "q95": 0.95}
EVIDENCE_COLUMNS = ("n_eff", "efficiency", "log_evidence", "log_evidence_std", "log_noise_evidence",
                    "log_bayes_factor")
GNPE_COLUMNS = ("gnpe_iterations", "gnpe_ks_pvalue", "outside_kernel_fraction", "edge_fraction")


@dataclass(frozen=True)
class InferenceSettings:
    """The config's `inference` keys that shape a posterior.h5."""

    num_samples: int = 2000
    importance_sampling: bool = True
    events_per_batch: int = 64
    num_plot_events: int = 3
    gnpe_iterations: GibbsSettings = GibbsSettings()  # models with GNPE: the bounds of the Gibbs iterations

    @classmethod
    def from_settings(cls, settings: Settings) -> "InferenceSettings":
        """From config.inference_settings."""
        values = {key: settings[key] for key in cls.__dataclass_fields__ if key in settings}
        if "gnpe_iterations" in values:
            values["gnpe_iterations"] = GibbsSettings(**values["gnpe_iterations"])
        return cls(**values)


class EventPosterior(NamedTuple):
    """One event's samples, as posterior.h5 stores them."""

    samples: torch.Tensor  # float64 (S, P) physical values
    log_q: torch.Tensor  # (S,) what importance weights divide by: log q, or with GNPE log q - delta_log_prob_target
    columns: dict[str, torch.Tensor]  # /samples/<name> (S,) each: log_prob, and with GNPE the proxy columns
    events: dict[str, float]  # /events/<name>: with GNPE the GNPE_COLUMNS


class InferenceModel:
    """A stage model file, ready to infer: the network and its bundle."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path, self.device = str(path), torch.device(device)
        if self.path.endswith(".keras"):
            from .models.regression import load_regression_model

            self.network: Any = load_regression_model(path)
            self.kind, state = "gaussian_regression", self.network.info
        else:
            state = read_torch_file(path, "fingerprint")
            if "random_states" in state:
                raise ValueError(f"{path}: a checkpoint, not a stage model: infer takes "
                                 "results/<run>/stage_<k>/model_stage_<k>.pt")
            if "architecture" not in state or not isinstance(state["model"], dict):
                raise ValueError(f"{path}: not a flow model (a gaussian_regression stage model is a .keras file)")
            self.network = PosteriorModel(state["architecture"])
            self.network.load_state_dict(state["model"])
            self.network.to(self.device).eval()
            self.kind = "flow"
        self.state = state
        self.bundle = Bundle.read(state.get("inference"), self.path, self.device)
        self.names = list(self.bundle.problem.inference_parameters)
        self.gnpe = self.bundle.gnpe is not None

    def gnpe_sampler(self, iterations: GibbsSettings) -> GNPESampler:
        assert self.bundle.gnpe is not None and self.bundle.simulator is not None  # a model with GNPE
        return GNPESampler.from_bundle(self.network, self.bundle.trafo, self.bundle.gnpe,
                                       self.bundle.simulator.frequencies, iterations)

    def open(self, path: str | Path) -> ObservedFile:
        """An observed-data file, checked against this model."""
        simulator = self.bundle.simulator
        if simulator is None:
            return ObservedFile(path, "observations", num_inputs=self.bundle.num_inputs)
        return ObservedFile(path, "signals", detectors=simulator.detectors.names,
                            frequencies=simulator.frequencies.cpu().numpy())

    def prepare(self, block: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(network inputs, ASD features, whitened data complex128 (n, D, F) or None) of a block of events."""
        simulator, trafo = self.bundle.simulator, self.bundle.trafo
        if simulator is None:
            inputs = torch.as_tensor(block["inputs"], dtype=torch.float32, device=self.device)[:, None, :]
            return trafo.inputs_to_network(inputs), torch.zeros(len(inputs), 0, device=self.device), None
        whitened = torch.as_tensor(block["strain"] / block["asds"], device=self.device)
        inputs = torch.view_as_real(whitened.to(torch.complex64)).transpose(-1, -2).contiguous()
        asds = torch.as_tensor(block["asds"], device=self.device)
        features = torch.cat([simulator.asd_features(asd[None]) for asd in asds])  # one by one: no batch effect
        return trafo.inputs_to_network(inputs), features, whitened

    def gnpe_posterior(self, sampler: GNPESampler, whitened: torch.Tensor, features: torch.Tensor, event_id: int,
                       num_samples: int, seed: int, weigh: bool) -> EventPosterior:
        """One event's GNPE samples from its whitened data (D, F): the Gibbs samples, or when they are to be
        weighed those of the pass with the proxy density (GNPESampler)."""
        generator = seeds.generator(seed, "infer", int(event_id), device=self.device)
        chains = sampler.gibbs(whitened.to(self.device), features, num_samples, generator)
        events = {"gnpe_iterations": chains.iterations, "gnpe_ks_pvalue": chains.ks_pvalue,
                  **sampler.edge_fractions(chains.offsets)}
        if not weigh:
            unknown = torch.full((num_samples,), math.nan, dtype=torch.float64)
            used = (chains.samples[:, sampler.time] - chains.offsets).cpu()  # the proxies of the last iteration
            columns = {"log_prob": unknown, "time_proxy": used, "delta_log_prob_target": unknown}
            return EventPosterior(chains.samples.cpu(), unknown, columns, events)
        draw = sampler.importance_draw(whitened.to(self.device), features, chains.proxies, generator)
        columns = {"log_prob": draw.log_prob.cpu(), "time_proxy": draw.proxies.cpu(),
                   "delta_log_prob_target": draw.delta_log_prob_target.cpu()}
        return EventPosterior(draw.samples.cpu(), (draw.log_prob - draw.delta_log_prob_target).cpu(), columns, events)

    @torch.no_grad()
    def posterior(self, inputs: torch.Tensor, features: torch.Tensor, event_id: int, num_samples: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(physical samples float64 (S, P), log q in physical units (S,)) of one event (inputs (1, ...))."""
        generator = seeds.generator(seed, "infer", int(event_id))
        noise = torch.randn(num_samples, len(self.names), generator=generator).to(self.device)
        context = self.network.embedding(inputs, features)
        trafo, samples, log_q = self.bundle.trafo, [], []
        for start in range(0, num_samples, SAMPLE_BLOCK):
            z, log_q_network = self.network.from_noise(noise[start:start + SAMPLE_BLOCK], context)
            samples.append(trafo.labels_from_network(z).cpu())
            log_q.append((log_q_network.to(torch.float64) + trafo.log_abs_det_jacobian(z)).cpu())
        return torch.cat(samples), torch.cat(log_q)

    def predict(self, inputs: torch.Tensor, features: torch.Tensor) -> dict[str, np.ndarray]:
        """gaussian_regression: {label: mean, label_uncertainty: sigma} in physical units (n,) each; sigma
        to first order through the trafo (x sigma for labels standardised in log space)."""
        from .models.regression import to_tf

        mean, log_sigma = self.network(to_tf((inputs.cpu(), features.cpu())))
        trafo = self.bundle.trafo
        mean64 = torch.as_tensor(mean.numpy(), dtype=torch.float64)
        physical = trafo.labels_from_network(mean64)
        sigma = torch.exp(torch.as_tensor(log_sigma.numpy(), dtype=torch.float64)) * trafo.label_std
        sigma = torch.where(trafo.log_labels, sigma * physical, sigma)
        out = {}
        for i, name in enumerate(self.names):
            out[name], out[f"{name}_uncertainty"] = physical[:, i].numpy(), sigma[:, i].numpy()
        return out


class ImportanceWeights:
    """Dingo-IS of one event's samples: log prior, log likelihood, weights and the evidences."""

    def __init__(self, model: InferenceModel, plan: dict[str, Any]) -> None:
        problem = model.bundle.problem
        missing = [name for name in problem.inference_parameters if name not in problem.priors]
        if missing:
            raise ValueError(f"{model.path}: no prior for {missing} in the model file: importance sampling needs one")
        assert model.bundle.simulator is not None  # a likelihood means signals
        self.sampler = ImportanceSampler(problem, plan, model.bundle.simulator)

    @classmethod
    def for_model(cls, model: InferenceModel) -> tuple["ImportanceWeights | None", str | None]:
        """(the weigher, None), or (None, why importance sampling cannot run for this model)."""
        if model.kind != "flow":
            return None, "gaussian_regression has no samples"
        plan, reason = likelihood_plan(model.bundle.problem)
        return (None, reason) if plan is None else (cls(model, plan), None)

    def __call__(self, samples: torch.Tensor, log_q: torch.Tensor, whitened: torch.Tensor,
                 asd: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """({log_prior, log_likelihood, weights} (S,) each, {n_eff, efficiency, log_evidence, ...})."""
        log_prior = self.sampler.log_prior(samples)
        inside = torch.isfinite(log_prior)
        log_likelihood = torch.full_like(log_prior, math.nan)
        for start in range(0, len(samples), SAMPLE_BLOCK):
            block = slice(start, start + SAMPLE_BLOCK)
            where = inside[block].nonzero().flatten() + start
            if len(where):
                log_likelihood[where] = self.sampler.log_likelihood(samples[where], whitened, asd)
        log_w = torch.where(inside, log_likelihood + log_prior - log_q, torch.full_like(log_q, -math.inf))
        efficiency, log_evidence, log_evidence_std = summary(log_w)
        weights = torch.exp(log_w - torch.logsumexp(log_w, 0)) * len(log_w) if efficiency > 0 else \
            torch.zeros_like(log_w)
        log_noise = noise_log_likelihood(whitened)
        return ({"log_prior": log_prior.numpy(), "log_likelihood": log_likelihood.numpy(), "weights": weights.numpy()},
                {"n_eff": efficiency * len(log_w), "efficiency": efficiency, "log_evidence": log_evidence,
                 "log_evidence_std": log_evidence_std, "log_noise_evidence": log_noise,
                 "log_bayes_factor": log_evidence - log_noise})


def weighted_quantiles(values: np.ndarray, weights: np.ndarray | None, quantiles: Sequence[float]) -> np.ndarray:
    """Quantiles of samples (S,) with weights (S,) (None: equal), from the weighted empirical CDF."""
    order = np.argsort(values)
    cumulative = np.cumsum(np.ones(len(values)) if weights is None else weights[order])
    if cumulative[-1] <= 0:
        return np.full(len(quantiles), np.nan)
    index = np.searchsorted(cumulative / cumulative[-1], quantiles)
    return values[order][np.minimum(index, len(values) - 1)]


def _events(files: Sequence[ObservedFile], size: int) -> Iterator[dict[str, Any]]:
    for observed in files:
        yield from observed.blocks(size)


def infer(model_path: str | Path, event_files: Sequence[str | Path], outdir: str | Path,
          settings: InferenceSettings, device: str | torch.device = "cpu") -> int:
    """Write posterior.h5, summary.csv and (flow) corner.png of the events in `event_files` to
    `outdir`; return the number of events. Every file is checked against the model before anything
    is written; both files are written to temporary files, renamed when every event is done."""
    model = InferenceModel(model_path, device)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = [model.open(path) for path in event_files]
    try:
        ids = np.concatenate([f.event_id for f in files])
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{', '.join(map(str, event_files))}: an event_id appears twice across the files")
        labels = sorted(set.intersection(*(set(f.label_names) for f in files)))
        importance, skipped = ImportanceWeights.for_model(model) if settings.importance_sampling else \
            (None, "switched off")
        if settings.importance_sampling and skipped:
            log.warning("importance sampling skipped: %s", skipped)
        with atomic_path(outdir / "posterior.h5") as tmp, h5py.File(tmp, "w") as out, \
                atomic_path(outdir / "summary.csv") as summary:
            writer = _Writer(out, summary, model, settings, len(ids), labels, importance is not None)
            if skipped:
                out.attrs["importance_sampling_skipped"] = skipped
            for block in tqdm(_events(files, settings.events_per_batch), desc="infer",
                              total=sum(math.ceil(f.num_events / settings.events_per_batch) for f in files),
                              mininterval=5):
                writer.write(block, importance)
        if model.kind == "flow":
            writer.corner(outdir / "corner.png")
    finally:
        for f in files:
            f.close()
    log.info("%d events inferred with %s: %s", len(ids), model_path, outdir)
    return len(ids)


class _Writer:
    """Fills posterior.h5 and summary.csv block by block, and keeps the first events for the plots."""

    def __init__(self, out: h5py.File, summary: Path, model: InferenceModel, settings: InferenceSettings,
                 num_events: int, labels: Sequence[str], weigh: bool) -> None:
        self.out, self.summary, self.model, self.settings, self.labels = out, summary, model, settings, labels
        self.done = 0
        self.shown: list[tuple[int, np.ndarray, np.ndarray | None, list[float] | None]] = []
        self.seed = model.bundle.problem.seed or 0
        self.gnpe = model.gnpe_sampler(settings.gnpe_iterations) if model.gnpe else None
        layouts.write_header(out, layouts.POSTERIOR, {"inference": dataclasses.asdict(settings), "model": model.path,
                                                       "model_fingerprint": model.state["fingerprint"],
                                                       "problem": model.bundle.settings})
        out.attrs["model_type"] = model.kind
        out.create_dataset("event_id", (num_events,), dtype=np.int64)
        for name in labels:
            out.create_dataset(f"labels/{name}", (num_events,), dtype=np.float64)
        shape, chunks = (num_events, settings.num_samples), (1, settings.num_samples)
        if model.kind == "flow":
            columns = [*model.names, "log_prob", *(("time_proxy", "delta_log_prob_target") if model.gnpe else ()),
                       *(("log_prior", "log_likelihood", "weights") if weigh else ())]
            for name in columns:
                out.create_dataset(f"samples/{name}", shape, dtype=np.float64, chunks=chunks)
            for name in (EVIDENCE_COLUMNS if weigh else ()) + (GNPE_COLUMNS if model.gnpe else ()):
                out.create_dataset(f"events/{name}", (num_events,), dtype=np.float64)
        else:
            for name in model.names:
                for column in (name, f"{name}_uncertainty"):
                    out.create_dataset(f"predictions/{column}", (num_events,), dtype=np.float64)

    def write(self, block: dict[str, Any], importance: ImportanceWeights | None) -> None:
        model, out, start = self.model, self.out, self.done
        inputs, features, whitened = model.prepare(block)
        n = len(block["event_id"])
        out["event_id"][start:start + n] = block["event_id"]
        for name in self.labels:
            out[f"labels/{name}"][start:start + n] = block["labels"][name]
        base: list[dict[str, Any]] = [{"event_id": int(i)} for i in block["event_id"]]
        rows: list[dict[str, Any]] = []
        true_columns = [{f"{k}_true": float(block["labels"][k][j]) for k in self.labels} for j in range(n)]
        if model.kind == "gaussian_regression":
            predictions = model.predict(inputs, features)
            for column, values in predictions.items():
                out[f"predictions/{column}"][start:start + n] = values
            rows = [row | {k: float(v[j]) for k, v in predictions.items()} | true_columns[j]
                    for j, row in enumerate(base)]
        else:
            for j in range(n):
                event = self.event_posterior(inputs[j:j + 1], features[j:j + 1], whitened, j, block["event_id"][j],
                                             importance is not None)
                samples, weights, evidence = event.samples, None, dict(event.events)
                for i, name in enumerate(model.names):
                    out[f"samples/{name}"][start + j] = samples[:, i].numpy()
                for name, per_draw in event.columns.items():
                    out[f"samples/{name}"][start + j] = per_draw.numpy()
                if importance is not None:
                    assert whitened is not None  # importance sampling means signals
                    per_sample, weighed = importance(samples, event.log_q, whitened[j],
                                                     torch.as_tensor(block["asds"][j]))
                    for name, values in per_sample.items():
                        out[f"samples/{name}"][start + j] = values
                    evidence |= weighed
                    weights = per_sample["weights"]
                for name, value in evidence.items():
                    out[f"events/{name}"][start + j] = value
                row = base[j]
                for i, name in enumerate(model.names):
                    values = weighted_quantiles(samples[:, i].numpy(), weights, list(QUANTILES.values()))
                    row |= {f"{name}_{q}": float(v) for q, v in zip(QUANTILES, values, strict=True)}
                rows.append(row | evidence | true_columns[j])
                if len(self.shown) < self.settings.num_plot_events:
                    truths = [float(block["labels"][k][j]) for k in model.names] if set(model.names) <= set(
                        self.labels) else None
                    self.shown.append((int(block["event_id"][j]), samples.numpy(), weights, truths))
        pd.DataFrame(rows).to_csv(self.summary, mode="a", header=start == 0, index=False)
        self.done += n

    def event_posterior(self, inputs: torch.Tensor, features: torch.Tensor, whitened: torch.Tensor | None, j: int,
                        event_id: int, weigh: bool) -> EventPosterior:
        """The samples of event j of a block: inputs (1, ...), features (1, A), the block's whitened data."""
        settings, model = self.settings, self.model
        if self.gnpe is not None:
            assert whitened is not None  # GNPE means signals
            return model.gnpe_posterior(self.gnpe, whitened[j], features, event_id, settings.num_samples, self.seed,
                                        weigh)
        samples, log_q = model.posterior(inputs, features, event_id, settings.num_samples, self.seed)
        return EventPosterior(samples, log_q, {"log_prob": log_q}, {})

    def corner(self, path: Path) -> None:
        """Corner plots of the first num_plot_events events: network samples, reweighted ones, truths."""
        ids, samples, weights, truths = zip(*self.shown, strict=True)
        normalised = None if weights[0] is None else np.stack([w / w.sum() if w.sum() > 0 else w for w in weights])
        plots.corner_plots(np.stack(samples), normalised, None if truths[0] is None else np.array(truths),
                           self.model.names, path, titles=[f"event_id {i}" for i in ids])
