"""GPU check, run by hand on a machine with CUDA (CI has none): `python tests/gpu_check.py OUTDIR`.

Runs the tiny config through every step with the library functions (no Snakemake) on the
device (`--device`, default `cuda`): simulate, count, trafo, SVD, stage 0 uninterrupted and
stage 0 stopped after every epoch (runtime limit max_epochs_per_run: 1) and resumed, stage 1,
evaluate. Then the data-parallel path (`--ranks`, default 2 where 2 GPUs are visible, else 1;
2 on the CPU): stage 0 on that many ranks started and supervised as a training job starts them
(NCCL on GPUs, gloo on the CPU), uninterrupted and stopped after every epoch and resumed.
Prints a JSON report: the device, the seconds of stage 0, how often the resumed stage stopped,
whether it equals the uninterrupted one, the same for the ranks, and the metrics.

Exit status: 0 when each resumed stage 0 was stopped and resumed after every epoch and its model
equals its uninterrupted one bit for bit (torch.equal on every tensor); 1, with a message naming
the tensors that differ, otherwise. Without CUDA it refuses to run (exit 2) unless `--device cpu`
is given, a dry run of the same check on the CPU.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
STAGE_0_EPOCHS = 4


def merged(base, override):
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def parse_args(argv):
    """(OUTDIR, device); exits 2 with a message when the device is CUDA and CUDA is not available."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="an empty or new folder for the run's files")
    parser.add_argument("--device", default="cuda",
                        help="torch device: cuda (default), cuda:<n>, or cpu for a dry run of the check without a GPU")
    parser.add_argument("--ranks", type=int, default=None,
                        help="ranks of the data-parallel check (default: 2 where 2 GPUs are visible, else 1; "
                        "2 on the CPU)")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
                     "this check needs a GPU and does not fall back to the CPU; pass --device cpu for a dry run")
    ranks = args.ranks or (2 if args.device == "cpu" else min(2, torch.cuda.device_count()))
    if args.device != "cpu" and ranks > torch.cuda.device_count():
        parser.error(f"--ranks {ranks}: only {torch.cuda.device_count()} GPUs are visible (one rank per GPU)")
    return Path(args.outdir), args.device, ranks


def model_differences(uninterrupted, resumed):
    """The tensors of two stage models' weights (state dicts) that are not bitwise equal, one line each."""
    lines = [f"{key}: only in the {'resumed' if key in resumed else 'uninterrupted'} model"
             for key in sorted(set(uninterrupted) ^ set(resumed))]
    for key in (k for k in uninterrupted if k in resumed):
        a, b = uninterrupted[key], resumed[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            lines.append(f"{key}: {a.dtype}{list(a.shape)} uninterrupted, {b.dtype}{list(b.shape)} resumed")
        elif not torch.equal(a, b):
            largest = float((a.double() - b.double()).abs().max())
            lines.append(f"{key}: {int((a != b).sum())} of {a.numel()} values differ, max |difference| {largest:.3g}")
    return lines


def check_resume(uninterrupted_model, resumed_model, stops, expected_stops):
    """The problems of the resume check (empty when it passed): the resumed stage must have stopped
    `expected_stops` times and its model must equal the uninterrupted one bit for bit."""
    problems = []
    if stops != expected_stops:
        problems.append(f"the resumed stage 0 stopped {stops} times, expected {expected_stops} (once per epoch "
                        "but the last): the resume was not exercised as planned")
    a = torch.load(uninterrupted_model, map_location="cpu", weights_only=True)["model"]
    b = torch.load(resumed_model, map_location="cpu", weights_only=True)["model"]
    differences = model_differences(a, b)
    if differences:
        problems.append(f"the resumed stage 0 ({resumed_model}) differs from the uninterrupted one "
                        f"({uninterrupted_model}) in {len(differences)} tensors:\n  " + "\n  ".join(differences))
    return problems


def main(argv=None):
    out, device, ranks = parse_args(sys.argv[1:] if argv is None else argv)
    # the pipeline is imported once the device is known to be there
    from stagewise import config as settings
    from stagewise.evaluate.run import EvaluationInputs, evaluate
    from stagewise.simulate.files import simulate
    from stagewise.steps import build_svd_step, count_events_step, fit_trafo_step
    from stagewise.training.parallel import supervise
    from stagewise.training.runner import EXIT_STOPPED, StageStopped
    from stagewise.training.stage import StageInputs, StageOutputs, train_stage

    config = merged(yaml.safe_load((REPO / "config/config.yaml").read_text()),
                    yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text()))
    config = merged(config, {"local": {"device": device}, "training": {"stage_0": {"epochs": STAGE_0_EPOCHS}}})
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
    report = {"device": torch.cuda.get_device_name(torch.device(device)) if device != "cpu" else "cpu"}

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
    problems = check_resume(out / "uninterrupted/model_stage_0.pt", out / "resumed/model_stage_0.pt", stops,
                            STAGE_0_EPOCHS - 1)
    report["resume_stops"] = stops
    report["resumed_equals_uninterrupted"] = not problems

    def ranks_stage(folder, limits=None):
        """Stage 0 on `ranks` ranks, supervised as the training job does it: the job's exit status."""
        outputs = StageOutputs(model=out / folder / "model_stage_0.pt", history=out / folder / "history.csv")
        local = merged(config["local"], {"cpu_processes": ranks, "training_job": {"gpus": ranks}, **(limits or {})})
        job = dict(settings=settings.stage_settings(config, "stage_0"), local=local, name="stage_0",
                   inputs=StageInputs(**inputs, previous_model=None), outputs=outputs,
                   checkpoint_dir=out / folder / "checkpoints", threads=ranks, planned_stages=None, job_runtime=None,
                   intrinsic_prior=None)
        (out / folder).mkdir(parents=True, exist_ok=True)
        return supervise(ranks, job, None, out / folder / "train.log")

    start = time.monotonic()
    if ranks_stage("ranks_uninterrupted") != 0:
        problems.append(f"stage 0 on {ranks} ranks failed: see {out / 'ranks_uninterrupted/train.log'}")
    report["ranks"], report["ranks_stage_0_seconds"] = ranks, time.monotonic() - start
    ranks_stops = 0
    while (code := ranks_stage("ranks_resumed", {"runtime_limits": {"max_epochs_per_run": 1}})) == EXIT_STOPPED:
        ranks_stops += 1
    ranks_problems = [f"stage 0 on {ranks} ranks, resumed, exited {code}"] if code else check_resume(
        out / "ranks_uninterrupted/model_stage_0.pt", out / "ranks_resumed/model_stage_0.pt", ranks_stops,
        STAGE_0_EPOCHS - 1)
    report["ranks_resume_stops"], report["ranks_resumed_equals_uninterrupted"] = ranks_stops, not ranks_problems
    problems += ranks_problems
    stage("stage_1", "stage_1", previous=out / "uninterrupted/model_stage_0.pt")
    inputs = EvaluationInputs(model=out / "stage_1/model_stage_1.pt", trafo=out / "trafo.h5",
                              histories={"stage_0": out / "uninterrupted/history.csv",
                                         "stage_1": out / "stage_1/history.csv"},
                              test_files=split["test"], fiducial_asd=fiducial, asd_set=asd_set, svd=svd, compare={})
    report["metrics"] = evaluate(settings.evaluation_settings(config), config["local"], inputs, out / "evaluation")
    finish(report, problems)


def finish(report, problems):
    """Print the report and the verdict; exit 1 with the problems when there are any."""
    print(json.dumps(report, indent=2))
    if problems:
        sys.exit(f"gpu_check: FAILED on {report['device']}:\n" + "\n".join(problems))
    print(f"gpu_check: passed on {report['device']}: the resumed stage 0 equals the uninterrupted one bit for bit")


if __name__ == "__main__":
    main()
