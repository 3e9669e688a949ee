"""The evaluate step: test loss and P-P calibration on seeded test injections, with plots."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import seeds
from ..data import EventBank
from ..events import SIGNAL_DATASETS, read_events
from ..files import write_json
from ..priors import make_priors
from ..problem import intrinsic_names, make_simulator
from ..trafo import Trafo
from ..training.stage import batch_maker, load_model
from . import plots
from .calibration import credible_levels, ks_pvalues

log = logging.getLogger(__name__)


def posterior_samples(model, trafo, strain, features, num_samples, chunk):
    """Physical posterior samples (N, S, P) and network-space log q, `chunk` injections at a time."""
    out = []
    for start in tqdm(range(0, len(strain), chunk), desc="sampling", mininterval=5):
        z, _ = model.sample(strain[start:start + chunk], features[start:start + chunk], num_samples)
        out.append(trafo.labels_from_network(z).cpu().numpy())
    return np.concatenate(out)


def prior_stds(config, names):
    priors = make_priors({**config["intrinsic_prior"], **config["extrinsic_prior"]})
    return {n: priors[n].std() for n in names if n in priors}


def evaluate(config, inputs, outdir, threads=1):
    """Write metrics.json and the plots to `outdir`.

    inputs: dict with model (the last stage's), histories (dict stage -> history.csv),
    trafo, test_files, fiducial_asd, asd_set."""
    torch.set_num_threads(threads)
    settings = config["evaluation"]
    device = torch.device(config["local"]["device"])
    outdir = Path(outdir)
    model, state = load_model(inputs["model"], device)
    model.eval()
    last_stage = config["training"][state["stage"]]
    simulator = make_simulator(config, inputs["test_files"][0], inputs["fiducial_asd"], inputs["asd_set"], device,
                               config["model"]["num_asd_bands"])
    trafo = Trafo.load(inputs["trafo"])
    names = config["inference_parameters"]
    bank = EventBank(*read_events(inputs["test_files"], intrinsic_names(config), SIGNAL_DATASETS,
                                  limit=settings["num_injections"]), device)
    if len(bank) < settings["num_injections"]:
        raise ValueError(f"evaluation.num_injections: {settings['num_injections']} asked, "
                         f"the test split holds {len(bank)} events")
    generator = seeds.generator(config["seed"], "evaluation", device=device)
    theta, strain, features = batch_maker(bank, simulator, trafo, last_stage["asd"])(torch.arange(len(bank)), generator)
    with torch.no_grad():
        test_loss = float(model.loss(theta, strain, features))
    torch.manual_seed(seeds.derived_seed(config["seed"], "evaluation", "sampling"))
    samples = posterior_samples(model, trafo, strain, features, settings["num_samples"], chunk=16)
    truths = trafo.labels_from_network(theta).cpu().numpy()
    levels = credible_levels(samples, truths)
    pvalues = ks_pvalues(levels, names)
    stds = prior_stds(config, names)
    metrics = {
        "test_loss": test_loss,
        "num_injections": len(bank),
        "num_samples": settings["num_samples"],
        "pp_ks_pvalue": pvalues,
        "posterior_std_over_prior_std": {
            n: float(np.median(samples[:, :, i].std(axis=1)) / stds[n]) for i, n in enumerate(names) if stds.get(n)
        },
    }
    write_json(outdir / "metrics.json", metrics)
    log.info("test loss %.4f, P-P KS p-values %s", test_loss, pvalues)
    histories = [(stage, pd.read_csv(path)) for stage, path in inputs["histories"].items()]
    plots.loss_curves(histories, outdir / "loss_curves.png")
    plots.pp_plot(levels, names, pvalues, outdir / "pp_plot.png")
    shown = settings["num_plot_events"]
    plots.posterior_panels(samples[:shown], truths[:shown], names, outdir / "posteriors.png")
    return metrics
