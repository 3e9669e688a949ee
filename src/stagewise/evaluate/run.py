"""The evaluate step: test loss, P-P calibration and importance sampling on seeded test
injections, with the metrics, a per-injection table and the plots."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import seeds
from ..data import EventBank
from ..events import SIGNAL_DATASETS, read_events
from ..files import atomic_path, write_json, write_text
from ..priors import make_priors
from ..problem import intrinsic_names, make_simulator
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
    priors = make_priors({**config["intrinsic_prior"], **config["extrinsic_prior"]})
    return {n: priors[n].std() for n in names if n in priors}


def test_injections(config, inputs, model_stage, device):
    """Seeded test injections: (physical parameters, network-space theta, network inputs,
    ASD features, whitened data complex (N, D, F), ASDs (N, D, F)) and the simulator."""
    settings = config["evaluation"]
    simulator = make_simulator(config, inputs["test_files"][0], inputs["fiducial_asd"], inputs["asd_set"], device,
                               config["model"]["num_asd_bands"])
    bank = EventBank(*read_events(inputs["test_files"], intrinsic_names(config), SIGNAL_DATASETS,
                                  limit=settings["num_injections"]), device)
    if len(bank) < settings["num_injections"]:
        raise ValueError(f"evaluation.num_injections: {settings['num_injections']} asked, "
                         f"the test split holds {len(bank)} events")
    generator = seeds.generator(config["seed"], "evaluation", device=device)
    parameters, whitened, features, asds = simulator.draw(bank.h_plus, bank.h_cross, bank.labels, generator,
                                                          config["training"][model_stage]["asd"])
    data = torch.complex(whitened[:, :, 0].double(), whitened[:, :, 1].double())
    return parameters, whitened, features, data, asds, simulator


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
    parameters, whitened, features, data, asds, simulator = test_injections(config, inputs, state["stage"], device)
    theta, strain = trafo.labels_to_network(parameters), trafo.inputs_to_network(whitened)
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
        log_w = importance_sample(ImportanceSampler(config, plan, simulator), samples, log_q, data.cpu(), asds.cpu())
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
    tables = {detector: load_svd(path)[1] for detector, path in inputs["svd"].items()}
    plots.svd_mismatch(tables, outdir / "svd_mismatch.png")
    plots.label_distributions(truths, theta, names, outdir / "label_distributions.png")
