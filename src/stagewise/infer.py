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
    /samples/<parameter>     (N, S) physical values      flow only; with importance sampling and
                                                          effective_samples S = max_samples: entries beyond
                                                          /events/num_samples are NaN (weights 0)
    /samples/log_prob        (N, S) log q in physical units (GNPE: log r(t_hat) + log q; NaN without
                                                          importance sampling, where Gibbs samples have no density)
    /samples/log_prior, log_likelihood, weights (N, S)    with importance sampling: weights have mean 1,
                                                          0 outside the prior (log_likelihood NaN there)
    /samples/time_proxy, delta_log_prob_target (N, S)     GNPE: the proxy t_hat and log kernel(t_hat - t)
    /events/<column>         (N,) num_samples (drawn), n_eff, efficiency, log_evidence, log_evidence_std,
                             log_noise_evidence, log_bayes_factor, jsd_<parameter> (the network's marginal
                             against the importance-weighted one, nat)       with importance sampling
    /events/gnpe_iterations, gnpe_ks_pvalue, outside_kernel_fraction, edge_fraction (N,)   GNPE
    /predictions/<label>, <label>_uncertainty  (N,)      gaussian_regression
    /labels/<name>           (N,) the truth, when the observed files hold it
"""

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
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
from .evaluate.divergence import network_vs_exact, weighted_quantiles
from .evaluate.gnpe import GibbsSettings, GNPESampler, ProxyDensity
from .evaluate.importance import ImportanceSampler, SampleBudget, likelihood_plan, summary, weigh_until
from .files import atomic_path, read_torch_file
from .models.posterior import PosteriorModel
from .observed import ObservedFile
from .simulate.likelihood import noise_log_likelihood
from .sources import Bundle

log = logging.getLogger(__name__)
SAMPLE_BLOCK = 4096  # samples per pass through the flow and the likelihood: fixed, so that results never depend on it
QUANTILES = {"q05": 0.05, "median": 0.5, "q95": 0.95}
EVIDENCE_COLUMNS = ("num_samples", "n_eff", "efficiency", "log_evidence", "log_evidence_std", "log_noise_evidence",
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
    effective_samples: int | None = None  # importance sampling: batches of num_samples until this n_eff
    max_samples: int = 10000  # ... or until this many are drawn

    @property
    def budget(self) -> SampleBudget:
        return SampleBudget(self.num_samples, self.effective_samples, self.max_samples)

    @classmethod
    def from_settings(cls, settings: Settings) -> "InferenceSettings":
        """From config.inference_settings."""
        values = {key: settings[key] for key in cls.__dataclass_fields__ if key in settings}
        if "gnpe_iterations" in values:
            values["gnpe_iterations"] = GibbsSettings(**values["gnpe_iterations"])
        return cls(**values)


class Batch(NamedTuple):
    """A batch of one event's samples."""

    samples: torch.Tensor  # float64 (S, P) physical values
    log_q: torch.Tensor  # (S,) what importance weights divide by: log q, or with GNPE log q - delta_log_prob_target
    columns: dict[str, torch.Tensor]  # /samples/<name> (S,) each: log_prob, with GNPE the proxy columns


class EventPosterior(NamedTuple):
    """One event's samples, as posterior.h5 stores them."""

    samples: torch.Tensor  # float64 (n, P) physical values, every batch drawn
    columns: dict[str, torch.Tensor]  # /samples/<name> (n,) each
    events: dict[str, float]  # /events/<name>
    weights: np.ndarray | None  # (n,) importance weights of mean 1, None without importance sampling
    network: torch.Tensor  # (S, P) the network's samples (with GNPE the Gibbs samples): all there is without IS


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

    def gnpe_chains(self, sampler: GNPESampler, whitened: torch.Tensor, features: torch.Tensor, event_id: int,
                    num_samples: int, seed: int) -> tuple[Any, torch.Generator]:
        """One event's Gibbs chains (GNPESampler.gibbs) from its whitened data (D, F), and the event's generator
        to draw on with."""
        generator = seeds.generator(seed, "infer", int(event_id), device=self.device)
        return sampler.gibbs(whitened.to(self.device), features, num_samples, generator), generator

    def gnpe_batches(self, sampler: GNPESampler, whitened: torch.Tensor, features: torch.Tensor,
                     density: ProxyDensity, num_samples: int, generator: torch.Generator) -> Iterator[Batch]:
        """Batches of the importance-sampling pass with proxies from `density` (GNPESampler.importance_draw)."""
        while True:
            draw = sampler.importance_draw(whitened.to(self.device), features, density, num_samples, generator)
            columns = {"log_prob": draw.log_prob.cpu(), "time_proxy": draw.proxies.cpu(),
                       "delta_log_prob_target": draw.delta_log_prob_target.cpu()}
            yield Batch(draw.samples.cpu(), (draw.log_prob - draw.delta_log_prob_target).cpu(), columns)

    @torch.no_grad()
    def flow_batches(self, inputs: torch.Tensor, features: torch.Tensor, event_id: int, num_samples: int,
                     seed: int) -> Iterator[Batch]:
        """Batches of one event's samples (inputs (1, ...)): physical float64 (S, P) with log q in physical
        units (S,)."""
        generator = seeds.generator(seed, "infer", int(event_id))
        context = self.network.embedding(inputs, features)
        trafo = self.bundle.trafo
        while True:
            noise = torch.randn(num_samples, len(self.names), generator=generator).to(self.device)
            samples, log_q = [], []
            for start in range(0, num_samples, SAMPLE_BLOCK):
                drawn, log_q_drawn = trafo.physical_draws(*self.network.from_noise(noise[start:start + SAMPLE_BLOCK],
                                                                                   context))
                samples.append(drawn)
                log_q.append(log_q_drawn)
            yield Batch(torch.cat(samples), torch.cat(log_q), {"log_prob": torch.cat(log_q)})

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

    def weigh(self, batches: Iterable[Batch], whitened: torch.Tensor, asd: torch.Tensor,
              budget: SampleBudget) -> tuple[list[Batch], np.ndarray, dict[str, float]]:
        """(the batches drawn until `budget` is met, each with its log_prior, log_likelihood columns, the
        weights of all (n,) with mean 1, {num_samples, n_eff, efficiency, log_evidence, ...})."""
        drawn, log_w = weigh_until(batches, lambda batch: self.log_weights(batch, whitened, asd), budget)
        efficiency, log_evidence, log_evidence_std = summary(log_w)
        weights = torch.exp(log_w - torch.logsumexp(log_w, 0)) * len(log_w) if efficiency > 0 else \
            torch.zeros_like(log_w)
        log_noise = noise_log_likelihood(whitened)
        return drawn, weights.numpy(), {
            "num_samples": len(log_w), "n_eff": efficiency * len(log_w), "efficiency": efficiency,
            "log_evidence": log_evidence, "log_evidence_std": log_evidence_std, "log_noise_evidence": log_noise,
            "log_bayes_factor": log_evidence - log_noise}

    def log_weights(self, batch: Batch, whitened: torch.Tensor, asd: torch.Tensor) -> torch.Tensor:
        """log w (S,) of a batch, -inf outside the prior; adds its log_prior and log_likelihood columns."""
        log_prior = self.sampler.log_prior(batch.samples)
        inside = torch.isfinite(log_prior)
        log_likelihood = torch.full_like(log_prior, math.nan)
        for start in range(0, len(batch.samples), SAMPLE_BLOCK):
            block = slice(start, start + SAMPLE_BLOCK)
            where = inside[block].nonzero().flatten() + start
            if len(where):
                log_likelihood[where] = self.sampler.log_likelihood(batch.samples[where], whitened, asd)
        batch.columns.update(log_prior=log_prior, log_likelihood=log_likelihood)
        return torch.where(inside, log_likelihood + log_prior - batch.log_q, torch.full_like(batch.log_q, -math.inf))


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
        self.shown: list[tuple[int, EventPosterior, list[float] | None]] = []
        self.seed = model.bundle.problem.seed or 0
        self.gnpe = model.gnpe_sampler(settings.gnpe_iterations) if model.gnpe else None
        layouts.write_header(out, layouts.POSTERIOR, {"inference": dataclasses.asdict(settings), "model": model.path,
                                                       "model_fingerprint": model.state["fingerprint"],
                                                       "problem": model.bundle.settings})
        out.attrs["model_type"] = model.kind
        out.create_dataset("event_id", (num_events,), dtype=np.int64)
        for name in labels:
            out.create_dataset(f"labels/{name}", (num_events,), dtype=np.float64)
        width = settings.budget.width if weigh else settings.num_samples
        shape, chunks = (num_events, width), (1, settings.num_samples)  # chunks never written take no room
        if model.kind == "flow":
            columns = [*model.names, "log_prob", *(("time_proxy", "delta_log_prob_target") if model.gnpe else ()),
                       *(("log_prior", "log_likelihood", "weights") if weigh else ())]
            for name in columns:
                out.create_dataset(f"samples/{name}", shape, dtype=np.float64, chunks=chunks,
                                   fillvalue=0.0 if name == "weights" else np.nan)
            jsd = tuple(f"jsd_{name}" for name in model.names)
            for name in (EVIDENCE_COLUMNS + jsd if weigh else ()) + (GNPE_COLUMNS if model.gnpe else ()):
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
                asd = None if whitened is None else torch.as_tensor(block["asds"][j])
                event = self.event_posterior(inputs[j:j + 1], features[j:j + 1], whitened, asd, j,
                                             block["event_id"][j], importance)
                drawn = len(event.samples)
                for i, name in enumerate(model.names):
                    out[f"samples/{name}"][start + j, :drawn] = event.samples[:, i].numpy()
                for name, per_draw in event.columns.items():
                    out[f"samples/{name}"][start + j, :drawn] = per_draw.numpy()
                if event.weights is not None:
                    out["samples/weights"][start + j, :drawn] = event.weights
                for name, value in event.events.items():
                    out[f"events/{name}"][start + j] = value
                row = base[j]
                for i, name in enumerate(model.names):
                    values = weighted_quantiles(event.samples[:, i].numpy(), event.weights, list(QUANTILES.values()))
                    row |= {f"{name}_{q}": float(v) for q, v in zip(QUANTILES, values, strict=True)}
                rows.append(row | event.events | true_columns[j])
                if len(self.shown) < self.settings.num_plot_events:
                    truths = [float(block["labels"][k][j]) for k in model.names] if set(model.names) <= set(
                        self.labels) else None
                    self.shown.append((int(block["event_id"][j]), event, truths))
        pd.DataFrame(rows).to_csv(self.summary, mode="a", header=start == 0, index=False)
        self.done += n

    def event_posterior(self, inputs: torch.Tensor, features: torch.Tensor, whitened: torch.Tensor | None,
                        asd: torch.Tensor | None, j: int, event_id: int,
                        importance: "ImportanceWeights | None") -> EventPosterior:
        """The samples of event j of a block: inputs (1, ...), features (1, A), the block's whitened data,
        the event's ASD; importance-weighted batches until the sample budget is met, when weighed."""
        settings, model, events = self.settings, self.model, {}
        if self.gnpe is not None:
            assert whitened is not None  # GNPE means signals
            sampler = self.gnpe
            chains, generator = model.gnpe_chains(sampler, whitened[j], features, event_id, settings.num_samples,
                                                  self.seed)
            network = chains.samples.cpu()
            events = {"gnpe_iterations": chains.iterations, "gnpe_ks_pvalue": chains.ks_pvalue,
                      **sampler.edge_fractions(chains.offsets)}
            if importance is None:
                unknown = torch.full((settings.num_samples,), math.nan, dtype=torch.float64)
                used = (chains.samples[:, sampler.time] - chains.offsets).cpu()  # the proxies of the last iteration
                columns = {"log_prob": unknown, "time_proxy": used, "delta_log_prob_target": unknown}
                return EventPosterior(network, columns, events, None, network)
            batches = model.gnpe_batches(sampler, whitened[j], features, ProxyDensity(chains.proxies),
                                         settings.num_samples, generator)
        else:
            batches = model.flow_batches(inputs, features, event_id, settings.num_samples, self.seed)
            if importance is None:
                batch = next(batches)
                return EventPosterior(batch.samples, batch.columns, events, None, batch.samples)
        assert whitened is not None and asd is not None  # importance sampling means signals
        drawn, weights, evidence = importance.weigh(batches, whitened[j], asd, settings.budget)
        samples = torch.cat([batch.samples for batch in drawn])
        columns = {name: torch.cat([batch.columns[name] for batch in drawn]) for name in drawn[0].columns}
        if self.gnpe is None:
            network = drawn[0].samples
        divergences = network_vs_exact(network.numpy(), samples.numpy(), weights / max(weights.sum(), 1e-300),
                                       model.names)
        events |= evidence | {f"jsd_{name}": value for name, value in divergences.items()}
        return EventPosterior(samples, columns, events, weights, network)

    def corner(self, path: Path) -> None:
        """Corner plots of the first num_plot_events events: network samples, reweighted ones, truths."""
        ids, events, truths = zip(*self.shown, strict=True)
        exact = None if events[0].weights is None else [
            (e.samples.numpy(), e.weights / e.weights.sum() if e.weights.sum() > 0 else e.weights) for e in events]
        plots.corner_plots(np.stack([e.network.numpy() for e in events]), exact,
                           None if truths[0] is None else np.array(truths), self.model.names, path,
                           titles=[f"event_id {i}" for i in ids])
