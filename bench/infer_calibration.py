"""`make bench-infer`: is `infer` calibrated on observed events, and as efficient as `evaluate`?

Needs a finished default run (`make run`). Writes `--events` labelled observed events of the
default problem (each measured with an ASD drawn from the ASD set, as the last stage trains),
infers them with importance sampling from the last stage's model file alone, and writes
bench/infer_calibration.json: the importance-weighted P-P p-value of every parameter, the
median efficiency, and evaluate's median efficiency (metrics.json) beside it.

    python bench/infer_calibration.py [--run default] [--events 200] [--out bench/infer_calibration.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import yaml

from stagewise import config as settings
from stagewise.evaluate.calibration import combined_pvalue, credible_levels, ks_pvalues
from stagewise.files import write_json
from stagewise.infer import InferenceSettings, infer
from stagewise.steps import simulate_observed_step

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="default")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--out", default=str(REPO / "bench" / "infer_calibration.json"))
    args = parser.parse_args()
    run = REPO / "results" / args.run
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    model = run / f"{settings.stage_names(config)[-1]}" / f"model_{settings.stage_names(config)[-1]}.pt"
    if not model.exists():
        sys.exit(f"{model}: not found: run `make run` first")
    torch.set_num_threads(config["local"]["threads"])
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        observed = folder / "observed.h5"
        observation_settings = settings.observed_simulation_settings(config) | {"simulated_events": args.events,
                                                                                "seed": config["seed"] + 1}
        simulate_observed_step(observation_settings, run / "data/fiducial_asd.h5", run / "data/asd_set.h5", observed)
        started = time.perf_counter()
        infer(model, [observed], folder / "out", InferenceSettings(config["evaluation"]["num_samples"], True, 64, 1))
        seconds = time.perf_counter() - started
        table = pd.read_csv(folder / "out/summary.csv")
        with h5py.File(folder / "out/posterior.h5") as f:
            names = list(config["inference_parameters"])
            samples = np.stack([f["samples"][n][()] for n in names], axis=-1)
            weights = f["samples/weights"][()]
            truths = np.stack([f["labels"][n][()] for n in names], axis=-1)
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    pvalues = ks_pvalues(credible_levels(samples, truths, weights), names)
    network = ks_pvalues(credible_levels(samples, truths), names)
    evaluate = json.loads((run / "evaluation/metrics.json").read_text())["importance_sampling"]
    result = {
        "events": args.events, "samples_per_event": config["evaluation"]["num_samples"],
        "importance_weighted_pp_ks_pvalue": pvalues, "pp_ks_pvalue_combined": combined_pvalue(pvalues),
        "network_pp_ks_pvalue": network,
        "efficiency_median": float(table["efficiency"].median()),
        "efficiency_q16": float(table["efficiency"].quantile(0.16)),
        "evaluate_efficiency_median": evaluate["efficiency_median"],
        "efficiency_ratio_to_evaluate": float(table["efficiency"].median()) / evaluate["efficiency_median"],
        "infer_seconds": seconds, "model": str(model.relative_to(REPO)),
        "measured": time.strftime("%Y-%m-%d"),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
