"""The evaluate step: the last stage's model on seeded test injections. Both model types get the
test loss, per-label residuals, pulls and coverage, the metrics table and the common plots; the
flow (a posterior) also P-P calibration, posterior widths, corner plots and importance sampling."""

import functools
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import layouts, seeds
from ..config import Problem, Settings, is_regression, label_weights
from ..files import atomic_path, write_json, write_text
from ..models.posterior import PosteriorModel, load_flow_model
from ..priors import make_priors
from ..sources import Injections, SignalSource, Source, make_source
from ..svd import load_svd
from ..trafo import Trafo
from . import plots
from .calibration import combined_pvalue, credible_levels, gaussian_summary, ks_pvalues
from .divergence import network_vs_exact
from .gnpe import GibbsSettings, GNPESampler, ProxyDensity
from .importance import (
    Exact,
    ImportanceSampler,
    SampleBudget,
    efficiency_quantiles,
    likelihood_plan,
    normalised_weights,
    summary,
    weigh_until,
)

log = logging.getLogger(__name__)
SAMPLING_CHUNK = 16


@dataclass(frozen=True)
class EvaluationInputs:
    """The files the evaluation reads."""

    model: str  # the last stage's model file
    histories: dict[str, str]  # stage -> history.csv
    trafo: str
    test_files: list[str]
    fiducial_asd: str | None  # None for observations
    asd_set: str | None
    svd: dict[str, str]  # basis name -> svd_<name>.h5
    compare: dict[str, str]  # other run -> its metrics.json


class TestSet(NamedTuple):
    """The seeded test injections, physical and as the network sees them."""

    source: Source
    injections: Injections
    theta: torch.Tensor  # (N, P) labels in network space
    network_inputs: torch.Tensor  # the trafo's standardised inputs
    truths: np.ndarray  # (N, P) physical labels, from theta


def test_set(settings: Settings, inputs: EvaluationInputs, trafo: Trafo, stage: str,
             device: str | torch.device) -> TestSet:
    """The first evaluation.num_injections test events with their extrinsic parameters, ASDs and noise
    drawn as in `stage`'s training, seeded by the run's seed."""
    problem, num_injections = Problem.from_settings(settings), settings["evaluation"]["num_injections"]
    source = make_source(problem, inputs.test_files[0], inputs.fiducial_asd, inputs.asd_set, device,
                         settings["model"]["num_asd_bands"])
    bank = source.first_events(inputs.test_files, num_injections)
    if len(bank) < num_injections:
        raise ValueError(f"evaluation.num_injections: {num_injections} asked, the test split holds {len(bank)} events")
    generator = seeds.generator(settings["seed"], "evaluation", device=device)
    index = torch.arange(len(bank), device=device)
    injections = source.injections(bank, index, generator, settings["training"][stage]["asd"])
    theta = trafo.labels_to_network(injections.parameters)
    truths = torch.stack([injections.parameters[name] for name in trafo.names], dim=-1).cpu().numpy()
    return TestSet(source, injections, theta, trafo.inputs_to_network(injections.inputs), truths)


def evaluate(settings: Settings, local: Settings, inputs: EvaluationInputs, outdir: str | Path,
             threads: int = 1) -> dict[str, Any]:
    """Write metrics.json, metrics.html and the plots (the flow: also importance_sampling.csv) to
    `outdir`; return the metrics. settings: config.evaluation_settings; local: config `local`."""
    torch.set_num_threads(threads)
    outdir, trafo = Path(outdir), Trafo.load(inputs.trafo)
    names = settings["inference_parameters"]
    if is_regression(settings):
        metrics, pulls, test = regression_metrics(settings, inputs, trafo, threads)
    else:
        metrics, pulls, test = flow_metrics(settings, inputs, trafo, torch.device(local["device"]), outdir)
    write_metrics(metrics, inputs.compare, outdir)
    histories = [(stage, read_history(path)) for stage, path in inputs.histories.items()]
    plots.loss_curves(histories, outdir / "loss_curves.png")
    plots.pulls({name: pulls[:, i] for i, name in enumerate(names)}, outdir / "pulls.png")
    tables = {name: load_svd(path)[1] for name, path in inputs.svd.items()}
    plots.svd_mismatch(tables, outdir / "svd_mismatch.png")
    plots.label_distributions(test.truths, test.theta.cpu().numpy(), names, outdir / "label_distributions.png")
    return metrics


def metrics_head(model_type: str, test: TestSet, test_loss: float) -> dict[str, Any]:
    """The first keys of metrics.json, the same for every model type."""
    return {"model_type": model_type, "test_data_digest": test_data_digest(test.truths, test.injections.inputs),
            "test_loss": test_loss, "num_injections": len(test.truths)}


def flow_metrics(settings: Settings, inputs: EvaluationInputs, trafo: Trafo, device: torch.device,
                 outdir: Path) -> tuple[dict[str, Any], np.ndarray, TestSet]:
    """(metrics, pulls of the posterior means (N, P), test set) of the flow; writes its own files:
    importance_sampling.csv, pp_plot.png and corner.png, with a likelihood network_vs_exact.png and
    network_vs_exact_worst.png, and with GNPE gnpe.csv, gnpe_iterations.png and time_posterior.png."""
    model, state = load_flow_model(inputs.model, device)
    model.eval()
    test = test_set(settings, inputs, trafo, state["stage"], device)
    problem, evaluation = Problem.from_settings(settings), settings["evaluation"]
    names = settings["inference_parameters"]
    test_loss = flow_test_loss(model, trafo, test, settings["seed"])
    sampler = None
    if problem.gnpe_kernel is not None:
        assert isinstance(test.source, SignalSource)  # GNPE aligns signals
        sampler = GNPESampler.from_bundle(model, trafo, state["inference"]["gnpe"], test.source.simulator.frequencies,
                                          GibbsSettings(**settings["gnpe"]["iterations"]))
    posteriors = flow_posteriors(model, sampler, trafo, test, settings)
    samples = posteriors.samples.numpy()
    levels = credible_levels(samples, test.truths)
    pvalues = ks_pvalues(levels, names)
    priors = make_priors(problem.priors)
    prior_stds = {n: priors[n].std() for n in names}
    metrics = metrics_head("flow", test, test_loss) | {
        "num_samples": evaluation["num_samples"],
        "pp_ks_pvalue": pvalues,
        "pp_ks_pvalue_combined": combined_pvalue(pvalues),
        "posterior_std_over_prior_std": {
            n: float(np.median(samples[:, :, i].std(axis=1)) / prior_stds[n]) for i, n in enumerate(names)
            if prior_stds[n]
        },
        "per_label": gaussian_summary(names, test.theta.cpu().numpy(), posteriors.mean_network.numpy(),
                                      posteriors.std_network.numpy(), test.truths, samples.mean(1)),
    }
    budget = SampleBudget(evaluation["num_samples"], evaluation["effective_samples"], evaluation["max_samples"])
    metrics["importance_sampling"], exact, per_injection = importance_sampling(problem, test, posteriors.draws,
                                                                               budget)
    if exact is not None:
        per_injection, metrics["network_vs_exact"] = network_vs_exact_report(samples, exact, per_injection, budget,
                                                                             test.truths, names, outdir)
    else:  # no likelihood, nothing exact to compare with
        for plot in ("network_vs_exact", "network_vs_exact_worst"):
            plots.empty(f"no importance sampling: {metrics['importance_sampling']['skipped']}", outdir / f"{plot}.png")
    with atomic_path(outdir / "importance_sampling.csv") as tmp:
        per_injection.to_csv(tmp, index=False)
    log.info("test loss %.4f, P-P KS p-values %s, importance sampling %s, network vs exact %s", test_loss, pvalues,
             metrics["importance_sampling"], metrics.get("network_vs_exact"))
    plots.pp_plot(levels, names, pvalues, outdir / "pp_plot.png")
    shown = evaluation["num_plot_events"]
    shown_exact = None if exact is None else exact[:shown]
    plots.corner_plots(samples[:shown], shown_exact, test.truths[:shown], names, outdir / "corner.png")
    if sampler is not None and posteriors.gnpe is not None:  # GNPE
        metrics["gnpe"] = gnpe_report(posteriors.gnpe, per_injection, sampler, outdir)
        time = names.index("time")
        plots.time_posteriors(samples[:shown, :, time],
                              None if shown_exact is None else [(s[:, time], w) for s, w in shown_exact],
                              test.truths[:shown, time], outdir / "time_posterior.png")
    pulls = (posteriors.mean_network.numpy() - test.theta.cpu().numpy()) / posteriors.std_network.numpy()
    return metrics, pulls, test


Draws = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


class FlowPosteriors(NamedTuple):
    """The flow's posteriors of the test injections."""

    samples: torch.Tensor  # (N, S, P) physical: the network's (with GNPE the Gibbs samples)
    draws: Draws | None  # injection -> batches of samples (S, P) and their log q (S,) to weigh; None: no likelihood
    mean_network: torch.Tensor  # (N, P) mean of the samples in network space
    std_network: torch.Tensor  # (N, P) their std
    gnpe: pd.DataFrame | None  # GNPE: a row per injection (gnpe_posteriors)


def flow_posteriors(model: PosteriorModel, sampler: GNPESampler | None, trafo: Trafo, test: TestSet,
                    settings: Settings) -> FlowPosteriors:
    """Draw evaluation.num_samples per test injection: from the flow, or with GNPE by Gibbs sampling; and,
    when there is a likelihood, the batches importance sampling weighs: the flow's samples and more of
    them, or with GNPE passes with proxies from a density fitted to the converged ones."""
    num_samples, names, seed = settings["evaluation"]["num_samples"], settings["inference_parameters"], settings["seed"]
    weigh = likelihood_plan(Problem.from_settings(settings))[0] is not None
    inputs, features = test.network_inputs, test.injections.asd_features
    if sampler is None:
        torch.manual_seed(seeds.derived_seed(seed, "evaluation", "sampling"))
        samples, log_q, mean, std = posterior_samples(model, trafo, inputs, features, num_samples)

        def flow_draws(i: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            yield samples[i], log_q[i]
            generator = seeds.generator(seed, "evaluation", "sampling", i, device=inputs.device)
            with torch.no_grad():
                context = model.embedding(inputs[i:i + 1], features[i:i + 1])
            while True:
                noise = torch.randn(num_samples, len(names), generator=generator, device=inputs.device)
                yield trafo.physical_draws(*model.from_noise(noise, context))

        return FlowPosteriors(samples, flow_draws if weigh else None, mean, std, None)
    data = test.injections.whitened_data
    assert data is not None  # GNPE means signals
    samples, densities, table = gnpe_posteriors(sampler, test, num_samples, seed)

    def gnpe_draws(i: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in itertools.count():
            generator = seeds.generator(seed, "evaluation", "gnpe_draw", i, batch, device=data.device)
            draw = sampler.importance_draw(data[i], features[i:i + 1], densities[i], num_samples, generator)
            yield draw.samples.cpu(), (draw.log_prob - draw.delta_log_prob_target).cpu()

    # the trafo is affine in each label (or its log): the pulls are those of physical space
    z = trafo.labels_to_network({name: samples[..., i] for i, name in enumerate(names)})
    return FlowPosteriors(samples, gnpe_draws if weigh else None, z.mean(1), z.std(1), table)


def flow_test_loss(model: PosteriorModel, trafo: Trafo, test: TestSet, seed: int) -> float:
    """-log q of the test injections' labels; with GNPE of the data and labels aligned to proxies drawn as
    in training."""
    theta, inputs = test.theta, test.network_inputs
    simulator = getattr(test.source, "simulator", None)
    if simulator is not None and simulator.gnpe_kernel is not None:
        generator = seeds.generator(seed, "evaluation", "gnpe_loss", device=inputs.device)
        parameters, aligned = simulator.align(test.injections.parameters, test.injections.inputs, generator)
        theta, inputs = trafo.labels_to_network(parameters), trafo.inputs_to_network(aligned)
    with torch.no_grad():
        return float(model.loss(theta, inputs, test.injections.asd_features))


def gnpe_posteriors(sampler: GNPESampler, test: TestSet, num_samples: int,
                    seed: int) -> tuple[torch.Tensor, list[ProxyDensity], pd.DataFrame]:
    """(Gibbs samples (N, S, P), each injection's density of converged proxies, a table per injection:
    iterations, last KS p-value, edge fractions)."""
    data, features = test.injections.whitened_data, test.injections.asd_features
    assert data is not None  # GNPE means signals
    samples, densities, rows = [], [], []
    for i in tqdm(range(len(data)), desc="GNPE sampling", mininterval=5):
        generator = seeds.generator(seed, "evaluation", "gnpe", i, device=data.device)
        chains = sampler.gibbs(data[i], features[i:i + 1], num_samples, generator)
        samples.append(chains.samples.cpu())
        densities.append(ProxyDensity(chains.proxies))
        rows.append({"injection": i, "iterations": chains.iterations, "ks_pvalue": chains.ks_pvalue,
                     **sampler.edge_fractions(chains.offsets)})
    return torch.stack(samples), densities, pd.DataFrame(rows)


def gnpe_report(table: pd.DataFrame, efficiencies: pd.DataFrame, sampler: GNPESampler,
                outdir: Path) -> dict[str, Any]:
    """The metrics' gnpe section; writes gnpe.csv (with each injection's efficiency from `efficiencies`, the
    table of importance_sampling.csv, when weighed) and the plot of efficiency against the iterations."""
    if len(efficiencies):
        table = table.merge(efficiencies[["injection", "efficiency"]], on="injection")
    with atomic_path(outdir / "gnpe.csv") as tmp:
        table.to_csv(tmp, index=False)
    plots.gnpe_iterations(table, outdir / "gnpe_iterations.png")
    bounds = sampler.settings
    unconverged = table["ks_pvalue"] < bounds.ks_pvalue
    return {"kernel": sampler.kernel, "iterations_median": float(table["iterations"].median()),
            "iterations_max": int(table["iterations"].max()), "injections_not_converged": int(unconverged.sum()),
            "outside_kernel_fraction_median": float(table["outside_kernel_fraction"].median()),
            "edge_fraction_median": float(table["edge_fraction"].median())}


def posterior_samples(model: PosteriorModel, trafo: Trafo, strain: torch.Tensor, features: torch.Tensor,
                      num_samples: int) -> tuple[torch.Tensor, ...]:
    """Physical posterior samples (N, S, P), their log q in physical space (N, S), and the mean and
    std of the samples in network space (N, P) each."""
    samples, log_q, means, stds = [], [], [], []
    for start in tqdm(range(0, len(strain), SAMPLING_CHUNK), desc="sampling", mininterval=5):
        chunk = slice(start, start + SAMPLING_CHUNK)
        z, log_q_network = model.sample(strain[chunk], features[chunk], num_samples)
        drawn, log_q_drawn = trafo.physical_draws(z, log_q_network)
        samples.append(drawn)
        log_q.append(log_q_drawn)
        means.append(z.mean(1).cpu())
        stds.append(z.std(1).cpu())
    return torch.cat(samples), torch.cat(log_q), torch.cat(means), torch.cat(stds)


IS_COLUMNS = ["injection", "efficiency", "n_eff", "num_samples", "log_evidence", "log_evidence_std"]


def importance_sampling(problem: Problem, test: TestSet, draws: Draws | None,
                        budget: SampleBudget) -> tuple[dict[str, Any], list[Exact] | None, pd.DataFrame]:
    """(the metrics' importance_sampling section, each injection's weighed samples (n, P) with their
    normalised weights (n,), or None when it cannot run, a table of IS_COLUMNS with a row per injection,
    empty when it cannot run). Each injection gets batches until `budget` is met."""
    plan, reason = likelihood_plan(problem)
    if plan is None or draws is None:
        log.info("importance sampling skipped: %s", reason)
        return {"skipped": reason}, None, pd.DataFrame(columns=IS_COLUMNS)
    data, asds = test.injections.whitened_data, test.injections.asds
    assert isinstance(test.source, SignalSource) and data is not None and asds is not None  # a likelihood: signals
    sampler = ImportanceSampler(problem, plan, test.source.simulator)
    rows, exact = [], []
    for i in tqdm(range(len(test.truths)), desc="importance sampling", mininterval=5):
        weigh = functools.partial(_log_weights, sampler, data[i].cpu(), asds[i].cpu())
        drawn, log_w = weigh_until(draws(i), weigh, budget)
        efficiency, log_evidence, log_evidence_std = summary(log_w)
        rows.append((i, efficiency, efficiency * len(log_w), len(log_w), log_evidence, log_evidence_std))
        exact.append(Exact(torch.cat([samples for samples, _ in drawn]).numpy(), normalised_weights(log_w)))
    table = pd.DataFrame(rows, columns=IS_COLUMNS)
    levels = np.stack([credible_levels(e.samples[None], test.truths[i:i + 1], e.weights[None])[0]
                       for i, e in enumerate(exact)])
    reweighted = ks_pvalues(levels, problem.inference_parameters)
    section = {
        **efficiency_quantiles(table["efficiency"]),
        "log_evidence_std_median": float(table["log_evidence_std"].median()),
        "effective_samples_median": float(table["n_eff"].median()),
        "samples_median": float(table["num_samples"].median()),
        "phase": plan["phase"],
        "pp_ks_pvalue": reweighted,
        "pp_ks_pvalue_combined": combined_pvalue(reweighted),
    }
    return section, exact, table


def _log_weights(sampler: ImportanceSampler, data: torch.Tensor, asd: torch.Tensor,
                 batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    samples, log_q = batch
    return sampler.log_weights(samples, log_q, data, asd)


def network_vs_exact_report(network: np.ndarray, exact: list[Exact], table: pd.DataFrame, budget: SampleBudget,
                            truths: np.ndarray, names: list[str], outdir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(the importance-sampling table with a column jsd_<name> per parameter, the metrics' network_vs_exact
    section); plots their distribution over the injections with at least budget.effective_samples, and the
    corner plot of the one with the largest divergence."""
    rows = [network_vs_exact(network[i], e.samples, e.weights, names) for i, e in enumerate(exact)]
    table = table.assign(**{f"jsd_{name}": [row[name] for row in rows] for name in names})
    threshold = budget.effective_samples or 0
    used = table[table["n_eff"] >= threshold]
    section: dict[str, Any] = {"min_effective_samples": threshold, "injections_used": len(used),
                               "injections_left_out": len(table) - len(used)}
    for name in names:
        values = used[f"jsd_{name}"].dropna()
        section[name] = {"jsd_median": float(values.median()) if len(values) else None,
                         "jsd_q90": float(values.quantile(0.9)) if len(values) else None}
    plots.network_vs_exact({name: used[f"jsd_{name}"].to_numpy() for name in names}, outdir / "network_vs_exact.png")
    if len(used):
        worst = int(used.loc[used[[f"jsd_{n}" for n in names]].max(axis=1).idxmax(), "injection"])
        largest = max(rows[worst].values())
        plots.corner_plots(network[worst:worst + 1], [exact[worst]], truths[worst:worst + 1], names,
                           outdir / "network_vs_exact_worst.png",
                           titles=[f"test injection {worst}: largest JSD {largest:.3g} nat"])
    else:
        plots.empty(f"no injection reached {threshold} effective samples", outdir / "network_vs_exact_worst.png")
    return table, section


def regression_metrics(settings: Settings, inputs: EvaluationInputs, trafo: Trafo,
                       threads: int) -> tuple[dict[str, Any], np.ndarray, TestSet]:
    """(metrics, pulls of the predicted means (N, P), test set) of `model.type: gaussian_regression`."""
    from ..models import regression

    regression.configure(threads, seeds.derived_seed(settings["seed"], "evaluation"))
    model = regression.load_regression_model(inputs.model)
    test = test_set(settings, inputs, trafo, model.info["stage"], "cpu")
    names = settings["inference_parameters"]
    theta_tf, strain_tf, features_tf = regression.to_tf((test.theta, test.network_inputs, test.injections.asd_features))
    mean, log_sigma = model((strain_tf, features_tf))
    weights = np.array(label_weights(settings["model"], names), dtype=np.float32)
    test_loss = float(regression.gaussian_nll(theta_tf, mean, log_sigma, weights))
    mean, sigma = mean.numpy().astype(np.float64), np.exp(log_sigma.numpy().astype(np.float64))
    predicted = trafo.labels_from_network(torch.as_tensor(mean)).numpy()
    theta = test.theta.cpu().numpy()
    metrics = metrics_head("gaussian_regression", test, test_loss) | {
        "per_label": gaussian_summary(names, theta, mean, sigma, test.truths, predicted),
    }
    log.info("test loss %.4f, per label %s", test_loss, metrics["per_label"])
    return metrics, (mean - theta) / sigma, test


def read_history(path: str) -> pd.DataFrame:
    """history.csv; files written before 2026-12 call the validation loss and time test_loss and time_test."""
    return pd.read_csv(path).rename(columns=layouts.LEGACY_HISTORY_NAMES)


def test_data_digest(truths: np.ndarray, raw_inputs: torch.Tensor) -> str:
    """A short hash of the test injections (labels and inputs): equal digests mean two runs were
    evaluated on the same data."""
    digest = hashlib.sha256(np.ascontiguousarray(truths, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(raw_inputs.cpu().numpy()).tobytes())
    return digest.hexdigest()[:16]


def write_metrics(metrics: dict[str, Any], compare: dict[str, str], outdir: Path) -> None:
    """metrics.json, and the same as an HTML table for the report with the side-by-side comparison."""
    write_json(outdir / "metrics.json", metrics)
    flat = pd.json_normalize(metrics, sep=".").T.rename(columns={0: "value"})
    table = flat.to_html(float_format="{:.6g}".format)  # six significant digits: a p-value of 1e-14 is not 0.0
    html = f"<h3>metrics.json</h3>{table}{comparison_html(metrics, compare)}"
    write_text(outdir / "metrics.html", f"<html><body>{html}</body></html>\n")


def comparison_html(metrics: dict[str, Any], others: dict[str, str]) -> str:
    """Per-label residuals, pulls and coverage of this run beside those of the runs in `others`
    ({run: metrics.json path}) that were evaluated on the same test data."""
    if not others:
        return ""
    columns, skipped = {"this run": metrics}, []
    for run, path in others.items():
        other = json.loads(Path(path).read_text())
        if other.get("test_data_digest") != metrics["test_data_digest"] or "per_label" not in other:
            skipped.append(run)
        else:
            columns[f"{run} ({other['model_type']})"] = other
    rows = {(name, key): {column: m["per_label"].get(name, {}).get(key) for column, m in columns.items()}
            for name, values in metrics["per_label"].items() for key in values}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc[("all", "test_loss"), :] = [m["test_loss"] for m in columns.values()]
    note = f"<p>Not compared (other test data): {', '.join(skipped)}</p>" if skipped else ""
    return f"<h3>Side by side (same test injections)</h3>{table.to_html(float_format='%.4g')}{note}"
