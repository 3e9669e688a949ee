"""The evaluate step: test loss, P-P calibration and importance sampling on seeded test
injections, with the metrics, a per-injection table and the plots."""

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
from .calibration import combined_pvalue, credible_levels, ks_pvalues
from .importance import ImportanceSampler, efficiency_quantiles, importance_sample, likelihood_plan, \
    normalised_weights, summary

log = logging.getLogger(__name__)
SAMPLING_CHUNK = 16


def posterior_samples(model, trafo, strain, features, num_samples):
    """Physical posterior samples (N, S, P) and their log q in physical space (N, S)."""
    samples, log_q = [], []
    for start in tqdm(range(0, len(strain), SAMPLING_CHUNK), desc="sampling", mininterval=5):
        chunk = slice(start, start + SAMPLING_CHUNK)
        z, log_q_network = model.sample(strain[chunk], features[chunk], num_samples)
        samples.append(trafo.labels_from_network(z).cpu())
        log_q.append((log_q_network.to(torch.float64) + trafo.log_abs_det_jacobian(z)).cpu())
    return torch.cat(samples), torch.cat(log_q)


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
    samples, log_q = posterior_samples(model, trafo, strain, features, settings["num_samples"])
    truths = trafo.labels_from_network(theta).cpu().numpy()
    levels = credible_levels(samples.numpy(), truths)
    pvalues = ks_pvalues(levels, names)
    stds = prior_stds(config, names)
    metrics = {
        "test_loss": test_loss,
        "num_injections": len(truths),
        "num_samples": settings["num_samples"],
        "pp_ks_pvalue": pvalues,
        "pp_ks_pvalue_combined": combined_pvalue(pvalues),
        "posterior_std_over_prior_std": {
            n: float(np.median(samples[:, :, i].std(dim=1).numpy()) / stds[n]) for i, n in enumerate(names)
            if stds.get(n)
        },
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
    write_outputs(metrics, table, outdir)
    log.info("test loss %.4f, P-P KS p-values %s, importance sampling %s", test_loss, pvalues,
             metrics["importance_sampling"])
    make_plots(config, inputs, outdir, samples.numpy(), weights, truths, levels, pvalues,
               theta.cpu().numpy())
    return metrics


def write_outputs(metrics, table, outdir):
    """metrics.json, the same as an HTML table for the report, and the per-injection IS table."""
    write_json(outdir / "metrics.json", metrics)
    flat = pd.json_normalize(metrics, sep=".").T.rename(columns={0: "value"})
    write_text(outdir / "metrics.html", f"<html><body><h3>metrics.json</h3>{flat.to_html()}</body></html>\n")
    with atomic_path(outdir / "importance_sampling.csv") as tmp:
        table.to_csv(tmp, index=False)


def make_plots(config, inputs, outdir, samples, weights, truths, levels, pvalues, theta):
    names = config["inference_parameters"]
    histories = [(stage, pd.read_csv(path)) for stage, path in inputs["histories"].items()]
    plots.loss_curves(histories, outdir / "loss_curves.png")
    plots.pp_plot(levels, names, pvalues, outdir / "pp_plot.png")
    shown = config["evaluation"]["num_plot_events"]
    plots.corner_plots(samples[:shown], None if weights is None else weights[:shown], truths[:shown], names,
                       outdir / "corner.png")
    tables = {name: load_svd(path)[1] for name, path in inputs["svd"].items()}
    plots.svd_mismatch(tables, outdir / "svd_mismatch.png")
    plots.label_distributions(truths, theta, names, outdir / "label_distributions.png")
