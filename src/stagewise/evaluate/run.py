"""The evaluate step: test loss, P-P calibration and importance sampling on seeded test
injections, with the metrics, a per-injection table and the plots."""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import seeds
from ..files import atomic_path, write_json, write_text
from ..priors import make_priors
from ..problem import prior_specs
from ..sources import make_source
from ..svd import load_svd
from ..trafo import Trafo
from ..training.stage import load_model
from . import plots
from .calibration import combined_pvalue, credible_levels, gaussian_summary, ks_pvalues
from .importance import ImportanceSampler, efficiency_quantiles, importance_sample, likelihood_plan, \
    normalised_weights, summary

log = logging.getLogger(__name__)
SAMPLING_CHUNK = 16


def posterior_samples(model, trafo, strain, features, num_samples):
    """Physical posterior samples (N, S, P), their log q in physical space (N, S), and the mean and
    std of the samples in network space (N, P) each."""
    samples, log_q, means, stds = [], [], [], []
    for start in tqdm(range(0, len(strain), SAMPLING_CHUNK), desc="sampling", mininterval=5):
        chunk = slice(start, start + SAMPLING_CHUNK)
        z, log_q_network = model.sample(strain[chunk], features[chunk], num_samples)
        samples.append(trafo.labels_from_network(z).cpu())
        log_q.append((log_q_network.to(torch.float64) + trafo.log_abs_det_jacobian(z)).cpu())
        means.append(z.mean(1).cpu())
        stds.append(z.std(1).cpu())
    return torch.cat(samples), torch.cat(log_q), torch.cat(means), torch.cat(stds)


def prior_stds(config, names):
    priors = make_priors(prior_specs(config))
    return {n: priors[n].std() for n in names if n in priors}


def test_injections(config, inputs, model_stage, device):
    """The source and its seeded test injections: (physical parameters, inputs, ASD features,
    whitened data complex (N, D, F) and ASDs (N, D, F), both None for observations)."""
    num_injections = config["evaluation"]["num_injections"]
    source = make_source(config, inputs["test_files"][0], inputs.get("fiducial_asd"), inputs.get("asd_set"), device)
    bank = source.bank(inputs["test_files"], limit=num_injections)
    if len(bank) < num_injections:
        raise ValueError(f"evaluation.num_injections: {num_injections} asked, the test split holds {len(bank)} events")
    generator = seeds.generator(config["seed"], "evaluation", device=device)
    index = torch.arange(len(bank), device=device)
    return source, source.injections(bank, index, generator, config["training"][model_stage]["asd"])


def evaluate(config, inputs, outdir, threads=1):
    """Write metrics.json, metrics.html, importance_sampling.csv and the plots to `outdir`.

    inputs: dict with model (the last stage's), histories (dict stage -> history.csv),
    trafo, test_files, fiducial_asd, asd_set, svd (dict detector -> svd file)."""
    torch.set_num_threads(threads)
    settings = config["evaluation"]
    device = torch.device(config["local"]["device"])
    outdir = Path(outdir)
    model, state = load_model(inputs["model"], device)
    model.eval()
    trafo = Trafo.load(inputs["trafo"])
    names = config["inference_parameters"]
    source, (parameters, raw_inputs, features, data, asds) = test_injections(config, inputs, state["stage"], device)
    theta, strain = trafo.labels_to_network(parameters), trafo.inputs_to_network(raw_inputs)
    with torch.no_grad():
        test_loss = float(model.loss(theta, strain, features))
    torch.manual_seed(seeds.derived_seed(config["seed"], "evaluation", "sampling"))
    samples, log_q, mean_network, std_network = posterior_samples(model, trafo, strain, features,
                                                                  settings["num_samples"])
    truths = trafo.labels_from_network(theta).cpu().numpy()
    levels = credible_levels(samples.numpy(), truths)
    pvalues = ks_pvalues(levels, names)
    stds = prior_stds(config, names)
    per_label = gaussian_summary(names, theta.cpu().numpy(), mean_network.numpy(), std_network.numpy(), truths,
                                 samples.mean(1).numpy())
    metrics = {
        "model_type": "flow",
        "test_data_digest": test_data_digest(truths, raw_inputs),
        "test_loss": test_loss,
        "num_injections": len(truths),
        "num_samples": settings["num_samples"],
        "pp_ks_pvalue": pvalues,
        "pp_ks_pvalue_combined": combined_pvalue(pvalues),
        "posterior_std_over_prior_std": {
            n: float(np.median(samples[:, :, i].std(dim=1).numpy()) / stds[n]) for i, n in enumerate(names)
            if stds.get(n)
        },
        "per_label": per_label,
    }
    plan, reason = likelihood_plan(config)
    weights = None
    if plan is None:
        log.info("importance sampling skipped: %s", reason)
        metrics["importance_sampling"] = {"skipped": reason}
        table = pd.DataFrame(columns=["injection", "efficiency", "log_evidence", "log_evidence_std"])
    else:
        log_w = importance_sample(ImportanceSampler(config, plan, source.simulator), samples, log_q, data.cpu(),
                                  asds.cpu())
        table = pd.DataFrame([summary(row) for row in log_w], columns=["efficiency", "log_evidence", "log_evidence_std"])
        table.insert(0, "injection", range(len(table)))
        weights = normalised_weights(log_w)
        reweighted = ks_pvalues(credible_levels(samples.numpy(), truths, weights), names)
        metrics["importance_sampling"] = {
            **efficiency_quantiles(table["efficiency"]),
            "log_evidence_std_median": float(table["log_evidence_std"].median()),
            "phase": plan["phase"],
            "pp_ks_pvalue": reweighted,
            "pp_ks_pvalue_combined": combined_pvalue(reweighted),
        }
    write_metrics(metrics, inputs, outdir)
    with atomic_path(outdir / "importance_sampling.csv") as tmp:
        table.to_csv(tmp, index=False)
    log.info("test loss %.4f, P-P KS p-values %s, importance sampling %s", test_loss, pvalues,
             metrics["importance_sampling"])
    plots.pp_plot(levels, names, pvalues, outdir / "pp_plot.png")
    shown = settings["num_plot_events"]
    plots.corner_plots(samples.numpy()[:shown], None if weights is None else weights[:shown], truths[:shown], names,
                       outdir / "corner.png")
    pulls = (mean_network.numpy() - theta.cpu().numpy()) / std_network.numpy()
    common_plots(config, inputs, outdir, truths, theta.cpu().numpy(), pulls)
    return metrics


def evaluate_regression(config, inputs, outdir, threads=1):
    """The evaluate step of `model.type: gaussian_regression`: test loss, residuals, pulls and
    coverage per label, the comparison table and the plots."""
    from ..models import regression

    torch.set_num_threads(threads)
    regression.configure(threads, seeds.derived_seed(config["seed"], "evaluation"))
    outdir = Path(outdir)
    model = regression.load_model(inputs["model"])
    trafo = Trafo.load(inputs["trafo"])
    names = config["inference_parameters"]
    _, (parameters, raw_inputs, features, _, _) = test_injections(config, inputs, model.info["stage"], "cpu")
    theta, strain = trafo.labels_to_network(parameters), trafo.inputs_to_network(raw_inputs)
    theta_tf, strain_tf, features_tf = regression.to_tf((theta, strain, features))
    mean, log_sigma = model((strain_tf, features_tf))
    test_loss = float(regression.gaussian_nll(theta_tf, mean, log_sigma, regression.label_weights(config)))
    mean, sigma = mean.numpy().astype(np.float64), np.exp(log_sigma.numpy().astype(np.float64))
    truths = trafo.labels_from_network(theta).cpu().numpy()
    predicted = trafo.labels_from_network(torch.as_tensor(mean)).numpy()
    metrics = {
        "model_type": "gaussian_regression",
        "test_data_digest": test_data_digest(truths, raw_inputs),
        "test_loss": test_loss,
        "num_injections": len(truths),
        "per_label": gaussian_summary(names, theta.cpu().numpy(), mean, sigma, truths, predicted),
    }
    write_metrics(metrics, inputs, outdir)
    log.info("test loss %.4f, per label %s", test_loss, metrics["per_label"])
    common_plots(config, inputs, outdir, truths, theta.cpu().numpy(), (mean - theta.cpu().numpy()) / sigma)
    return metrics


def test_data_digest(truths, raw_inputs):
    """A short hash of the test injections (labels and inputs): equal digests mean two runs were
    evaluated on the same data."""
    digest = hashlib.sha256(np.ascontiguousarray(truths, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(raw_inputs.cpu().numpy()).tobytes())
    return digest.hexdigest()[:16]


def write_metrics(metrics, inputs, outdir):
    """metrics.json, and the same as an HTML table for the report with the side-by-side comparison."""
    write_json(outdir / "metrics.json", metrics)
    flat = pd.json_normalize(metrics, sep=".").T.rename(columns={0: "value"})
    html = f"<h3>metrics.json</h3>{flat.to_html()}{comparison_html(metrics, inputs.get('compare', {}))}"
    write_text(outdir / "metrics.html", f"<html><body>{html}</body></html>\n")


def comparison_html(metrics, others):
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


def common_plots(config, inputs, outdir, truths, theta, pulls):
    """The plots of both model types: loss curves, pulls, SVD mismatch and label distributions."""
    names = config["inference_parameters"]
    histories = [(stage, pd.read_csv(path)) for stage, path in inputs["histories"].items()]
    plots.loss_curves(histories, outdir / "loss_curves.png")
    plots.pulls({name: pulls[:, i] for i, name in enumerate(names)}, outdir / "pulls.png")
    tables = {name: load_svd(path)[1] for name, path in inputs["svd"].items()}
    plots.svd_mismatch(tables, outdir / "svd_mismatch.png")
    plots.label_distributions(truths, theta, names, outdir / "label_distributions.png")
