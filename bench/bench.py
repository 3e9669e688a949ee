"""`make bench`: how fast stagewise's data pipeline and steps are, measured on this machine.

Writes bench/results.json: one entry per figure, {"median", "min", "max"} over repeated
runs, a line describing the machine, and the details of each measurement. The goals are
in the README's Performance section; nothing here asserts a timing.

    python bench/bench.py [--repeats 5] [--out bench/results.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from snakemake.utils import update_config
from torch.utils.flop_counter import FlopCounterMode

from stagewise import config as settings
from stagewise import seeds
from stagewise.events import count_splits, write_event_file
from stagewise.files import write_json
from stagewise.simulate.files import simulate
from stagewise.simulate.likelihood import PHASE_POINTS
from stagewise.sources import make_source
from stagewise.steps import build_svd_step, count_events_step, fit_trafo_step
from stagewise.svd import fit_basis, mismatch_table
from stagewise.trafo import Trafo
from stagewise.training.optim import TorchRecipe
from stagewise.training.parallel import init_ranks
from stagewise.training.ranks import ONE_PROCESS
from stagewise.training.stage import StageSettings, new_flow_model

REPO = Path(__file__).resolve().parent.parent
STEPS = 8  # training steps per timing


def spread(values):
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"{'cuda ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def default_config(fixed_time=True, **local):
    """The default problem, by default with the arrival time fixed (config/fixed_time.yaml): the figures stay
    comparable with those measured before GNPE."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if fixed_time:
        update_config(config, yaml.safe_load((REPO / "config" / "fixed_time.yaml").read_text()))
    config["simulation"]["num_files"] = {"training": 4, "validation": 1, "test": 1}
    config["local"].update(local)
    settings.validate(config)
    return config


def prepare(folder, config):
    """The problem's simulated files, counts, trafo and SVD (the default: 4 training files of 2500 events)."""
    data = folder / "data"
    events = [data / f"{s}_{i:02d}.h5" for s, n in config["simulation"]["num_files"].items() for i in range(n)]
    fiducial, asd_set = data / "fiducial_asd.h5", data / "asd_set.h5"
    simulate(settings.simulation_settings(config), events, fiducial, asd_set)
    counts = config["simulation"]["num_files"]
    training, validation = counts["training"], counts["training"] + counts["validation"]
    split = {"training": events[:training], "trafo": events[:training], "validation": events[training:validation],
             "test": events[validation:]}
    count_events_step(settings.count_settings(config), split, folder / "counts.yaml")
    fit_trafo_step(settings.trafo_settings(config), split["trafo"], fiducial, folder / "trafo.h5")
    svd = {d: folder / f"svd_{d}.h5" for d in config["detectors"]}
    build_svd_step(settings.svd_settings(config), split["training"], fiducial, folder / "trafo.h5", svd)
    return dict(split=split, fiducial=fiducial, asd_set=asd_set, trafo=folder / "trafo.h5", svd=svd)


class Training:
    """The default model and stage_0 recipe, with the training split in memory on `device`."""

    def __init__(self, config, files, device, ranks=ONE_PROCESS):
        self.device = torch.device(device)
        stage = StageSettings.from_settings(settings.stage_settings(config, "stage_0"), "stage_0")
        self.source = make_source(stage.problem, files["split"]["training"][0], files["fiducial"], files["asd_set"],
                                  device, stage.model["num_asd_bands"])
        self.trafo = Trafo.load(files["trafo"])
        self.bank = self.source.bank(files["split"]["training"], stage.shuffle, config["local"]["memory_limit_mb"])
        self.model = new_flow_model(stage, self.source, self.trafo, files["svd"], self.bank)
        self.recipe = TorchRecipe(self.model, stage.training, ranks)
        self.batch_size = config["training"]["stage_0"]["batch_size"]
        self.make = self.source.batch_maker(self.bank, self.trafo, "fiducial")

    def batches(self, count, epoch=1):
        generator = seeds.generator(0, "bench", epoch, device=self.device)
        epoch_batches = self.bank.epoch(self.batch_size, generator, self.make)
        return [batch for _, batch in zip(range(count), epoch_batches, strict=False)]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def steps_per_second(self, batches):
        """Optimizer steps per second over `batches`, an iterable that may make each batch as it goes."""
        self.sync()
        start = time.perf_counter()
        count = 0
        for batch in batches:
            self.recipe.train_step(batch)
            count += 1
        self.sync()
        return count / (time.perf_counter() - start)

    def full_steps(self, epoch):
        """Steps that make their batch (event lookup, projection, whitening, noise) as they go."""
        generator = seeds.generator(0, "bench", epoch, device=self.device)
        epoch_batches = self.bank.epoch(self.batch_size, generator, self.make)
        return (batch for _, batch in zip(range(STEPS), epoch_batches, strict=False))

    def step_flops(self, batch):
        with FlopCounterMode(display=False) as counter:
            self.recipe.train_step(batch)
        return counter.get_total_flops()


def matmul_rate(device, size=1024, repeats=10):
    """FLOP/s of a size x size fp32 matmul on `device` (median of `repeats`)."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[2:])


def training_figures(training, repeats):
    """(a) pipeline efficiency and (c) the matmul fraction of the training step."""
    training.steps_per_second(training.batches(2))  # warm-up
    efficiency, fraction, full_rates = [], [], []
    pregenerated = training.batches(STEPS, epoch=99)
    flops = training.step_flops(pregenerated[0])
    for repeat in range(repeats):
        full = training.steps_per_second(training.full_steps(repeat))
        ready = training.steps_per_second(pregenerated)
        efficiency.append(full / ready)
        fraction.append(flops * ready / matmul_rate(training.device))
        full_rates.append(full * training.batch_size)
    details = {"batch_size": training.batch_size, "flops_per_step": flops,
               "samples_per_second_full_steps": spread(full_rates)}
    return spread(efficiency), spread(fraction), details


def data_parallel_rank(rank, size, threads, config, files, repeats, folder):
    """One rank of `size` (with `threads` threads) timing full training steps of the default problem; rank 0
    writes the samples/s of each repeat to folder/rates.json."""
    torch.set_num_threads(threads)
    ranks = init_ranks(rank, size, folder / "rendezvous", {"device": "cpu"}) if size > 1 else ONE_PROCESS
    training = Training(config, files, "cpu", ranks)
    training.steps_per_second(training.batches(2))  # warm-up
    rates = [training.steps_per_second(training.full_steps(repeat)) * training.batch_size for repeat in range(repeats)]
    if rank == 0:
        write_json(folder / "rates.json", rates)


def data_parallel_figure(config, files, repeats):
    """(ddp_2x1_vs_1x2) samples/s of full training steps on 2 ranks of 1 thread each (gloo) over 1 process of
    2 threads; each in fresh processes, alternated."""
    ratios, rates = [], {"2x1": [], "1x2": []}
    for _ in range(repeats):
        for name, size, threads in (("2x1", 2, 1), ("1x2", 1, 2)):
            with tempfile.TemporaryDirectory() as folder:
                torch.multiprocessing.spawn(data_parallel_rank, nprocs=size,
                                            args=(size, threads, config, files, 1, Path(folder)))
                rates[name] += json.loads((Path(folder) / "rates.json").read_text())
        ratios.append(rates["2x1"][-1] / rates["1x2"][-1])
    return spread(ratios), {name: spread(values) for name, values in rates.items()}


def small_files(folder, count, events=16):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"small_{i:04d}.h5")
        write_event_file(paths[-1], {"f0": rng.uniform(60, 240, events), "tau": rng.uniform(0.02, 0.09, events)},
                         {"h_plus": np.zeros((events, 8), np.complex64),
                          "h_cross": np.zeros((events, 8), np.complex64)},
                         "signals", np.arange(8.0))
    return paths


def count_events_figure(config, folder, repeats, count=2000):
    """(d) count_events' files/s over `count` small files against just opening each with h5py."""
    paths = small_files(folder, count)
    split = {"training": paths, "trafo": paths, "validation": paths[:1], "test": paths[:1]}
    ratios, layout_only = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            h5py.File(path, "r").close()
        opened = time.perf_counter() - start
        start = time.perf_counter()
        count_events_step(settings.count_settings(config), split, folder / "counts.yaml")
        ratios.append(opened / (time.perf_counter() - start))
        start = time.perf_counter()
        count_splits(split)
        layout_only.append(opened / (time.perf_counter() - start))
    return spread(ratios), {"files": count, "events_per_file": 16, "layout_only_ratio": spread(layout_only)}, paths


def observation_files(folder, count=4, events=2500, features=512):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        paths.append(folder / f"observations_{i}.h5")
        write_event_file(paths[-1], {"a": rng.uniform(0, 1, events), "b": rng.uniform(0, 1, events)},
                         {"inputs": rng.normal(size=(events, features)).astype(np.float32)}, "observations")
    return paths


def read_seconds(paths, datasets, events):
    """Wall time of a plain sequential h5py read of the first `events` events of `datasets`, and the MB read."""
    start, remaining, size = time.perf_counter(), events, 0
    for path in paths:
        with h5py.File(path, "r") as f:
            n = min(remaining, f[datasets[0]].shape[0])
            size += sum(f[d][:n].nbytes for d in datasets)
            remaining -= n
    return time.perf_counter() - start, size / 2**20


def trafo_figure(config, files, folder, repeats):
    """(e) fit_trafo's MB/s against a plain sequential h5py read of the datasets it reads, for
    observations (read and moments); for signals (where the fit also simulates projection and
    noise for every event) in the details."""
    events = config["trafo"]["num_batches"] * config["trafo"]["batch_size"]
    observed = {**config, "data": {**config["data"], "kind": "observations", "simulate": False},
                "inference_parameters": ["a", "b"], "trafo": {**config["trafo"], "log_labels": []},
                "intrinsic_prior": {n: {"distribution": "uniform", "low": 0.0, "high": 1.0} for n in "ab"}}
    cases = {"observations": (observed, observation_files(folder), None,
                              ["data/inputs", "labels/a", "labels/b"]),
             "signals": (config, files["split"]["trafo"], files["fiducial"],
                         ["data/h_plus", "data/h_cross", "labels/f0", "labels/tau"])}
    ratios, details = {}, {"events": events}
    for case, (case_config, paths, fiducial, datasets) in cases.items():
        ratios[case] = []
        for _ in range(repeats):
            read, megabytes = read_seconds(paths, datasets, events)
            start = time.perf_counter()
            fit_trafo_step(settings.trafo_settings(case_config), paths, fiducial, folder / f"trafo_{case}.h5")
            ratios[case].append(read / (time.perf_counter() - start))
        details[f"{case}_megabytes"] = megabytes
        details[f"{case}_ratio"] = spread(ratios[case])
    return spread(ratios["observations"]), details


def svd_figure(config, files, repeats):
    """(f) build_svd's full SVD against a randomized one (torch.svd_lowrank) at the default size:
    speed-up of the randomized SVD, and both mismatches on held-out signals."""
    from stagewise.sources import make_simulator
    from stagewise.svd import whitened_signal_vectors

    svd, problem = config["svd"], settings.Problem.from_settings(config)
    simulator = make_simulator(problem, files["split"]["training"][0], files["fiducial"])
    trafo = Trafo.load(files["trafo"])
    bank = make_source(problem, files["split"]["training"][0], files["fiducial"], files["asd_set"]).first_events(
        files["split"]["training"], svd["num_training_samples"] + svd["num_validation_samples"])
    h_plus, h_cross = bank.data["h_plus"], bank.data["h_cross"]
    vectors = whitened_signal_vectors(simulator, trafo, h_plus, h_cross, seeds.generator(0, "bench-svd"))[:, 0]
    train, held_out = vectors[:svd["num_training_samples"]], vectors[svd["num_training_samples"]:]
    speedups, full_times, low_times = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        basis, _ = fit_basis(train, svd["size"])
        full_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        _, _, v = torch.svd_lowrank(train, q=svd["size"] + 10, niter=2)
        low_times.append(time.perf_counter() - start)
        speedups.append(full_times[-1] / low_times[-1])
    low_basis = v[:, :svd["size"]]
    mismatch = {name: float(mismatch_table(b, held_out)["mean"][-1]) for name, b in
                (("full", basis), ("randomized", low_basis))}
    return spread(speedups), {"full_seconds": spread(full_times), "randomized_seconds": spread(low_times),
                              "mean_mismatch_at_size": mismatch, "shape": list(train.shape)}


def inference_figures(config, files, training, folder, repeats, events=64, samples=2000):
    """(h) `infer` without importance sampling against the bare `model.sample` on the same events, both
    in samples/s (`infer_vs_sample`); and importance sampling's likelihood-and-prior evaluations/s over
    the bare sampling's samples/s (`importance_sampling_vs_sampling`). The model is the default's at
    initialisation, written as a stage model file with its inference bundle; the events are a
    simulated observed set."""
    from stagewise.files import write_torch_file
    from stagewise.infer import ImportanceWeights, InferenceModel, InferenceSettings, infer
    from stagewise.sources import inference_bundle
    from stagewise.steps import simulate_observed_step

    observed = folder / "observed.h5"
    simulate_observed_step(settings.observed_simulation_settings(config) | {"simulated_events": events},
                           files["fiducial"], files["asd_set"], observed)
    problem = {"data": {"kind": "signals", "simulate": True}, "intrinsic_prior": config["intrinsic_prior"],
               **{key: config[key] for key in settings.PROBLEM_KEYS}}
    model_path = folder / "model_stage_0.pt"
    write_torch_file(model_path, {"fingerprint": "bench", "architecture": training.model.architecture,
                                  "model": training.model.state_dict(),
                                  "inference": inference_bundle(problem, training.source, training.trafo)})
    model = InferenceModel(model_path)
    with model.open(observed) as f:
        block = f.read(0, events)
    inputs, features, whitened = model.prepare(block)
    ratios, infer_rates, bare_rates, weighing_ratios, weighing_rates = [], [], [], [], []
    for repeat in range(repeats):
        start = time.perf_counter()
        infer(model_path, [observed], folder / f"out_{repeat}", InferenceSettings(samples, False, 64, 1))
        infer_rates.append(events * samples / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(0, events, 16):  # as evaluate draws: 16 events per call
            model.network.sample(inputs[i:i + 16], features[i:i + 16], samples)
        bare_rates.append(events * samples / (time.perf_counter() - start))
        ratios.append(infer_rates[-1] / bare_rates[-1])
        batch = next(model.flow_batches(inputs[:1], features[:1], 0, samples, seed=repeat))
        weigh, _ = ImportanceWeights.for_model(model)
        start = time.perf_counter()
        weigh.log_weights(batch, whitened[0], torch.as_tensor(block["asds"][0]))
        weighing_rates.append(samples / (time.perf_counter() - start))
        weighing_ratios.append(weighing_rates[-1] / bare_rates[-1])
    return spread(ratios), spread(weighing_ratios), {
        "events": events, "samples_per_event": samples, "infer_samples_per_second": spread(infer_rates),
        "sample_samples_per_second": spread(bare_rates),
        "likelihood_and_prior_per_second": spread(weighing_rates),
        "phase": f"marginalised on {PHASE_POINTS} points per sample", "file_writing": "included in infer"}


def dry_run_figure(paths, repeats):
    """(g) `snakemake -n` wall time with 1,000 files in the training split: with a stand-in
    `scontrol` that answers at once (as SLURM's does on a login node, or where SLURM is not
    installed), and in the details as this machine is (where an installed SLURM client
    without a controller makes the SLURM plugin wait about 9 s at import)."""
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        for name in ("Snakefile", "workflow", "config", "src", "envs"):
            source = REPO / name
            (workdir / name).symlink_to(source, target_is_directory=source.is_dir())
        asd = paths[0].with_name("asd.h5")
        _write_asd(asd)
        override = {"data": {"simulate": False, "training_data_file": [str(p) for p in paths[:1000]],
                             "validation_data_file": [str(paths[0])], "test_data_file": [str(paths[1])],
                             "fiducial_asd_file": str(asd), "asd_set_file": str(asd)}}
        (workdir / "bench.yaml").write_text(yaml.safe_dump(override))
        shim = workdir / "bin"
        shim.mkdir()
        (shim / "scontrol").write_text("#!/bin/sh\nexit 1\n")
        (shim / "scontrol").chmod(0o755)
        command = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "config/config.yaml",
                   "config/fixed_time.yaml", "bench.yaml"]
        times = {"prompt_scontrol": [], "as_is": []}
        for _ in range(repeats):
            for case, path in (("prompt_scontrol", f"{shim}:{os.environ['PATH']}"), ("as_is", os.environ["PATH"])):
                start = time.perf_counter()
                result = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                                        env=dict(os.environ, CONDOR_CONFIG="/dev/null", PATH=path))
                times[case].append(time.perf_counter() - start)
                if result.returncode != 0:
                    raise RuntimeError(f"snakemake -n failed:\n{result.stderr[-2000:]}")
    return spread(times["prompt_scontrol"]), {"as_is_seconds": spread(times["as_is"])}


def _write_asd(path):
    from stagewise.detectors import write_asd_file

    write_asd_file(path, np.arange(8.0), {d: np.ones((1, 8)) for d in ("H1", "L1")})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    results, details = {"machine": machine()}, {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        config = default_config()
        started = time.perf_counter()
        files = prepare(folder, config)
        details["prepare_seconds"] = time.perf_counter() - started
        training = Training(config, files, "cpu")
        results["pipeline_efficiency"], results["matmul_fraction"], details["training"] = \
            training_figures(training, args.repeats)
        print("training figures done", flush=True)
        results["ddp_2x1_vs_1x2"], details["ddp_2x1_vs_1x2"] = data_parallel_figure(config, files, args.repeats)
        print("data-parallel comparison done", flush=True)
        (folder / "small").mkdir()
        results["count_events_vs_open"], details["count_events_vs_open"], paths = count_events_figure(
            config, folder / "small", args.repeats)
        results["trafo_vs_read"], details["trafo_vs_read"] = trafo_figure(config, files, folder, args.repeats)
        results["svd"], details["svd"] = svd_figure(config, files, args.repeats)
        print("step figures done", flush=True)
        results["infer_vs_sample"], results["importance_sampling_vs_sampling"], details["inference"] = \
            inference_figures(config, files, training, folder, args.repeats)
        print("inference figures done", flush=True)
        results["dry_run_seconds"], details["dry_run_seconds"] = dry_run_figure(paths, max(3, args.repeats // 2))
    results["details"] = details
    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
