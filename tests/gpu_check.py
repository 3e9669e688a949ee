"""GPU check, run by hand on a machine with CUDA (CI has none): `python tests/gpu_check.py OUTDIR`.

Runs the tiny config through every step with the library functions (no Snakemake) on
`cuda`: simulate, count, trafo, SVD, stage 0 stopped by a runtime limit and resumed,
stage 1, evaluate. Prints the metrics, the samples/s of stage 0 and whether the
resumed stage equals an uninterrupted one on the GPU.
"""

import json
import sys
import time
from pathlib import Path

import torch
import yaml

from stagewise import config as settings
from stagewise.evaluate.run import EvaluationInputs, evaluate
from stagewise.simulate.files import simulate
from stagewise.steps import build_svd_step, count_events_step, fit_trafo_step
from stagewise.training.runner import StageStopped
from stagewise.training.stage import StageInputs, StageOutputs, train_stage

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def merged(base, override):
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def main(outdir):
    out = Path(outdir)
    config = merged(yaml.safe_load((REPO / "config/config.yaml").read_text()),
                    yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text()))
    config = merged(config, {"local": {"device": DEVICE}, "training": {"stage_0": {"epochs": 4}}})
    settings.validate(config)  # fills the stages' defaults
    data = out / "data"
    events = [data / f"{s}_{i:02d}.h5" for s, n in config["simulation"]["num_files"].items() for i in range(n)]
    fiducial, asd_set = data / "fiducial_asd.h5", data / "asd_set.h5"
    simulate(settings.simulation_settings(config), events, fiducial, asd_set)
    split = {"training": events[:2], "trafo": events[:2], "validation": events[2:3], "test": events[3:4]}
    count_events_step(settings.count_settings(config), split, out / "counts.yaml")
    fit_trafo_step(settings.trafo_settings(config), split["trafo"], fiducial, out / "trafo.h5")
    svd = {d: out / f"svd_{d}.h5" for d in config["detectors"]}
    build_svd_step(settings.svd_settings(config), split["training"], fiducial, out / "trafo.h5", svd)
    inputs = dict(training_files=split["training"], validation_files=split["validation"], trafo=out / "trafo.h5",
                  svd=svd, fiducial_asd=fiducial, asd_set=asd_set)
    report = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"}

    def stage(name, folder, limits=None, previous=None):
        outputs = StageOutputs(model=out / folder / f"model_{name}.pt", history=out / folder / "history.csv")
        return train_stage(settings.stage_settings(config, name), merged(config["local"], limits or {}), name,
                           StageInputs(**inputs, previous_model=previous), outputs, out / folder / "checkpoints")

    start = time.monotonic()
    stage("stage_0", "uninterrupted")
    report["stage_0_seconds"] = time.monotonic() - start
    stops = 0
    while True:
        try:
            stage("stage_0", "resumed", {"runtime_limits": {"max_epochs_per_run": 1}})
            break
        except StageStopped:
            stops += 1
    a = torch.load(out / "uninterrupted/model_stage_0.pt", weights_only=False)["model"]
    b = torch.load(out / "resumed/model_stage_0.pt", weights_only=False)["model"]
    report["resume_stops"] = stops
    report["resumed_equals_uninterrupted"] = all(torch.equal(a[k], b[k]) for k in a)
    report["resumed_max_abs_difference"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    stage("stage_1", "stage_1", previous=out / "uninterrupted/model_stage_0.pt")
    inputs = EvaluationInputs(model=out / "stage_1/model_stage_1.pt", trafo=out / "trafo.h5",
                              histories={"stage_0": out / "uninterrupted/history.csv",
                                         "stage_1": out / "stage_1/history.csv"},
                              test_files=split["test"], fiducial_asd=fiducial, asd_set=asd_set, svd=svd, compare={})
    metrics = evaluate(settings.evaluation_settings(config), config["local"], inputs, out / "evaluation")
    report["metrics"] = metrics
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
