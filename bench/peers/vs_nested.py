"""`make bench-peers`, posteriors: stagewise's importance-weighted posteriors of observed events of the
default problem against bilby with dynesty on the same likelihood and priors.

The likelihood is stagewise's own (`ImportanceSampler.log_likelihood`: the whitened residual of every
detector, the phase marginalised on the same 512 points as importance sampling does), wrapped as a
`bilby.Likelihood`; the priors are those of config/config.yaml (f0 uniform, tau log-uniform, snr
uniform, the arrival time uniform). dynesty samples uniformly within its ellipsoid bounds ("unif", its
own choice below 10 dimensions), one process per run, each event twice with different seeds: the two
runs' divergence is the noise floor. stagewise infers the same events (GNPE's Gibbs sampling, then
importance sampling until `EFFECTIVE` effective samples) on one thread. bench/peers/peers.py runs it.
"""

import logging
import multiprocessing
import tempfile
import time
from pathlib import Path

import bilby
import h5py
import numpy as np
import torch
import yaml

from stagewise import config as settings
from stagewise.evaluate.divergence import marginal_jsd
from stagewise.infer import ImportanceWeights, InferenceModel, InferenceSettings, infer
from stagewise.steps import simulate_observed_step

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "results/default"
MODEL = RUN / "stage_1/model_stage_1.pt"
SEEDS = (1, 2)
OBSERVED_SEED = 1001  # the events are new: neither training's nor the test split's seed
EFFECTIVE = 4000  # stagewise's importance sampling: batches of 5,000 until this many effective samples
# (besides, the default settings' timing: one batch of 2,000, as `stagewise infer` without options)
log = logging.getLogger("vs_nested")


def write_observed_events(config, path, count):
    """`count` new events of the default problem in the layout of the infer step (observed/1), with their truths."""
    simulate_observed_step(settings.observed_simulation_settings(config) | {"simulated_events": count,
                                                                            "seed": OBSERVED_SEED},
                           str(RUN / "data/fiducial_asd.h5"), str(RUN / "data/asd_set.h5"), str(path))


def stagewise_posteriors(observed, folder, inference):
    """(seconds, per event {samples (n, P), weights (n,), truths (P,), log_evidence, ...}) of `stagewise infer`
    with InferenceSettings `inference` on one thread."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    infer(MODEL, [observed], folder, inference)
    seconds = time.perf_counter() - start
    names = InferenceModel(MODEL).names
    with h5py.File(folder / "posterior.h5") as f:
        events = []
        for e, n in enumerate(f["events/num_samples"][:].astype(int)):
            events.append({"samples": np.stack([f[f"samples/{name}"][e, :n] for name in names], axis=1),
                           "weights": f["samples/weights"][e, :n],
                           "truths": np.array([f[f"labels/{name}"][e] for name in names]),
                           **{key: float(f[f"events/{key}"][e]) for key in ("log_evidence", "log_evidence_std",
                                                                              "n_eff")}})
    return seconds, events


class StagewiseLikelihood(bilby.Likelihood):
    """stagewise's likelihood of one event, phase marginalised as its importance sampling does."""

    def __init__(self, sampler, names, whitened, asd):
        super().__init__()
        self.sampler, self.names, self.whitened, self.asd = sampler, names, whitened, asd

    def log_likelihood(self, parameters=None):
        point = torch.tensor([[parameters[name] for name in self.names]], dtype=torch.float64)
        return float(self.sampler.log_likelihood(point, self.whitened, self.asd)[0])


def bilby_priors(priors, names):
    kinds = {"uniform": bilby.core.prior.Uniform, "loguniform": bilby.core.prior.LogUniform}
    return bilby.core.prior.PriorDict({name: kinds[priors[name]["distribution"]](
        priors[name]["low"], priors[name]["high"], name=name) for name in names})


_WORKER = {}


def _start_worker(observed, count):
    torch.set_num_threads(1)
    model = InferenceModel(MODEL)
    weights, why = ImportanceWeights.for_model(model)
    assert weights is not None, why
    block = next(model.open(observed).blocks(count))
    _, _, whitened = model.prepare(block)
    _WORKER.update(model=model, sampler=weights.sampler, whitened=whitened, asds=torch.as_tensor(block["asds"]))


def nested_run(task):
    """One dynesty run of event `e` with seed `seed`: equal-weight posterior samples (m, P), log Z and its
    error, seconds and likelihood calls."""
    e, seed, priors, nlive = task
    names = _WORKER["model"].names
    likelihood = StagewiseLikelihood(_WORKER["sampler"], names, _WORKER["whitened"][e], _WORKER["asds"][e])
    with tempfile.TemporaryDirectory() as outdir:
        start = time.perf_counter()
        result = bilby.run_sampler(likelihood, bilby_priors(priors, names), sampler="dynesty", sample="unif",
                                   nlive=nlive, seed=seed, outdir=outdir, label=f"event{e}_seed{seed}",
                                   save=False, plot=False, resume=False, check_point=False, npool=1)
        seconds = time.perf_counter() - start
    return {"event": e, "seed": seed, "samples": result.posterior[names].to_numpy(),
            "log_evidence": float(result.log_evidence), "log_evidence_err": float(result.log_evidence_err),
            "seconds": seconds, "calls": int(result.num_likelihood_evaluations)}


def compare(count, nlive, folder):
    """Per event and parameter the divergences, the evidences and the times; see the module docstring."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    priors = {**config["intrinsic_prior"], **config["extrinsic_prior"]}
    observed = folder / "observed.h5"
    write_observed_events(config, observed, count)
    infer_seconds, ours = stagewise_posteriors(observed, folder / "infer", InferenceSettings(
        num_samples=5000, effective_samples=EFFECTIVE, max_samples=100_000, num_plot_events=1))
    default_seconds, default = stagewise_posteriors(observed, folder / "infer_default", InferenceSettings())
    log.info("stagewise infer: %d events in %.1f s (%.1f s with the default settings)", count, infer_seconds,
             default_seconds)
    tasks = [(e, seed, priors, nlive) for e in range(count) for seed in SEEDS]
    with multiprocessing.get_context("spawn").Pool(2, _start_worker, (observed, count)) as pool:
        runs = {}
        for run in pool.imap_unordered(nested_run, tasks):
            runs[run["event"], run["seed"]] = run
            log.info("dynesty event %d seed %d: %.0f s, %d calls, log Z %.2f +- %.2f", run["event"], run["seed"],
                     run["seconds"], run["calls"], run["log_evidence"], run["log_evidence_err"])
    names = InferenceModel(MODEL).names
    events = []
    for e in range(count):
        first, second = runs[e, SEEDS[0]], runs[e, SEEDS[1]]
        row = {"event": e, "stagewise_log_evidence": ours[e]["log_evidence"],
               "stagewise_log_evidence_std": ours[e]["log_evidence_std"], "stagewise_n_eff": ours[e]["n_eff"],
               "dynesty_log_evidence": first["log_evidence"], "dynesty_log_evidence_err": first["log_evidence_err"],
               "dynesty_log_evidence_seed2": second["log_evidence"],
               "dynesty_log_evidence_err_seed2": second["log_evidence_err"],
               "dynesty_samples": len(first["samples"]), "dynesty_seconds": first["seconds"],
               "stagewise_seconds": infer_seconds / count, "stagewise_default_seconds": default_seconds / count,
               "stagewise_default_n_eff": default[e]["n_eff"]}
        for p, name in enumerate(names):
            row[f"jsd_{name}"] = marginal_jsd(first["samples"][:, p], ours[e]["samples"][:, p], ours[e]["weights"])
            row[f"floor_{name}"] = marginal_jsd(first["samples"][:, p], second["samples"][:, p],
                                                np.ones(len(second["samples"])))
        events.append(row)
    return names, events, ours, runs
