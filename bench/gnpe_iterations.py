"""`make bench-gnpe`: importance-sampling efficiency of GNPE against a fixed number of Gibbs iterations,
beside the iterations the convergence rule (gnpe.iterations) chooses.

Needs a finished default run (`make run`). Writes `--events` labelled observed events of the default
problem (a free arrival time with GNPE), runs the Gibbs chains of each event for
up to the largest count in ITERATIONS, and after each count in ITERATIONS does the importance-sampling
pass (proxy density) and weighs it with the exact likelihood. Writes bench/gnpe_iterations.json: per
count the median and 16 % quantile of the efficiency over the events, and for the rule its median
iterations and efficiency.

    python bench/gnpe_iterations.py [--run default] [--events 50] [--out bench/gnpe_iterations.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from stagewise import config as settings
from stagewise.evaluate.gnpe import GibbsSettings, ProxyDensity, ks_pvalue
from stagewise.evaluate.importance import SampleBudget
from stagewise.files import write_json
from stagewise.infer import Batch, ImportanceWeights, InferenceModel
from stagewise.observed import ObservedFile
from stagewise.seeds import generator
from stagewise.steps import simulate_observed_step

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = (1, 2, 4, 8, 16, 30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="default")
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", default=str(REPO / "bench" / "gnpe_iterations.json"))
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    run, last = REPO / "results" / args.run, settings.stage_names(config)[-1]
    if not (run / last / f"model_{last}.pt").exists():
        sys.exit(f"{run / last}: no model: run `make run` first")
    torch.set_num_threads(config["local"]["threads"])
    model = InferenceModel(run / last / f"model_{last}.pt")
    rule = GibbsSettings(**config["gnpe"]["iterations"])
    sampler = model.gnpe_sampler(rule)
    weigh, _ = ImportanceWeights.for_model(model)
    efficiencies = {k: [] for k in ITERATIONS}
    chosen, chosen_efficiency = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        observed = Path(folder) / "observed.h5"
        simulate_observed_step(settings.observed_simulation_settings(config) | {
            "simulated_events": args.events, "seed": config["seed"] + 2}, run / "data/fiducial_asd.h5",
            run / "data/asd_set.h5", observed)
        with ObservedFile(observed, "signals", detectors=list(config["detectors"]),
                          frequencies=model.bundle.simulator.frequencies.numpy()) as events:
            block = events.read(0, args.events)
    _, features, whitened = model.prepare(block)
    for j in tqdm(range(args.events), desc="events"):
        g = generator(config["seed"], "bench_gnpe", j)
        proxies = sampler.blur(sampler.initial_times(whitened[j], features[j:j + 1], args.samples, g).double(), g)
        stopped = None
        for k in range(1, max(ITERATIONS) + 1):
            samples, _ = sampler.conditional(whitened[j], features[j:j + 1], proxies, g)
            new = sampler.blur(samples[:, sampler.time], g)
            converged = k >= rule.min and ks_pvalue(proxies, new) >= rule.ks_pvalue
            proxies = new
            if k in ITERATIONS or (stopped is None and (converged or k == rule.max)):
                draw = sampler.importance_draw(whitened[j], features[j:j + 1], ProxyDensity(proxies), args.samples, g)
                asd = torch.as_tensor(block["asds"][j])
                batch = Batch(draw.samples, draw.log_prob - draw.delta_log_prob_target, {})
                efficiency = weigh.weigh([batch], whitened[j], asd, SampleBudget(args.samples))[2]["efficiency"]
                if k in ITERATIONS:
                    efficiencies[k].append(efficiency)
                if stopped is None and (converged or k == rule.max):
                    stopped = k
                    chosen.append(k)
                    chosen_efficiency.append(efficiency)
    result = {
        "events": args.events, "samples_per_event": args.samples, "run": args.run,
        "fixed_iterations": {str(k): {"efficiency_median": float(np.median(v)),
                                      "efficiency_q16": float(np.quantile(v, 0.16))} for k, v in efficiencies.items()},
        "rule": {"settings": config["gnpe"]["iterations"], "iterations_median": float(np.median(chosen)),
                 "iterations_mean": float(np.mean(chosen)), "efficiency_median": float(np.median(chosen_efficiency)),
                 "efficiency_q16": float(np.quantile(chosen_efficiency, 0.16))},
        "seconds": time.perf_counter() - started, "measured": time.strftime("%Y-%m-%d"),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
