"""stagewise's batch maker against Dingo's real GW training transforms, feeding the same flow and embedding.

Dingo's side is its own code, used as a library (dingo-gw, bilby): a `WaveformDataset` built in memory
from the default problem's polarisations, its transforms set by Dingo's `set_train_transforms` (extrinsic
sampling, detector times, projection, noise-ASD sampling, whitening, noise, parameter standardisation,
repackaging) and applied batch-wise by `WaveformDataset.__getitems__` in the workers of a torch
DataLoader, as Dingo trains. Its batches feed the default model and stage_0 recipe of bench.py; our
side is the same model fed by stagewise's batch maker. Figure `vs_dingo`: our samples/s of full
training steps over Dingo's (goal >= 1.5) with the arrival time fixed (bench.default_config); figure
`vs_dingo_gnpe`: the same on the project's default problem, the arrival time free and aligned by GNPE on
both sides (stagewise's proxies; Dingo's GNPECoalescenceTimes). Run with the peers' environment
(`make peers-env`):

    .venv-peers/bin/python bench/peers/vs_dingo.py [--repeats 3]

Adapted, since Dingo's transforms cannot express the toy exactly (ADAPTED, also in the output):
the projection uses bilby's real H1/L1 (sky position, polarisation angle, geometric time delays,
distance scaling) instead of the toy's fixed antenna factors, time offsets and SNR scaling; a phase
rotation is added; the third label is the luminosity distance instead of the SNR; with GNPE Dingo draws a
proxy per detector and its proxies, the network's context in Dingo, are dropped (the stagewise network
takes none).
"""

import argparse
import contextlib
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data._utils.collate import default_collate

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import bench  # noqa: E402
from dingo.core.utils.torchutils import fix_random_seeds  # noqa: E402
from dingo.gw.dataset.waveform_dataset import WaveformDataset  # noqa: E402
from dingo.gw.noise.asd_dataset import ASDDataset  # noqa: E402
from dingo.gw.training.train_builders import set_train_transforms  # noqa: E402
from dingo.gw.transforms import ProjectOntoDetectors  # noqa: E402

log = logging.getLogger("vs_dingo")
FIGURES = {"vs_dingo": False, "vs_dingo_gnpe": True}  # figure: with GNPE (the arrival time free) or the time fixed
WORKERS = 2  # Dingo's DataLoader workers
REF_TIME = 1126259462.4  # GPS reference time of Dingo's GW150914 examples
D_REF, D_MIN, D_MAX = 4000.0, 100.0, 400.0  # Mpc: the polarisations have SNR D_REF / d, 40 to 10
ADAPTED = [
    "Projection: Dingo's ProjectOntoDetectors with bilby's real H1/L1 antenna patterns from ra, dec, psi "
    "(Dingo's default priors) and GetDetectorTimes' geometric delays, instead of the toy's fixed antenna "
    "factors and time offsets.",
    f"SNR: Dingo's luminosity-distance scaling instead of the toy's scaling to a drawn network SNR: the "
    f"polarisations are stored normalised to network SNR 1 (toy antenna factors, fiducial ASD, whitened as "
    f"Dingo whitens) at d_ref = {D_REF:g} Mpc, d ~ Uniform({D_MIN:g}, {D_MAX:g}) Mpc: SNR d_ref / d, 40 to 10, "
    "with the toy's antenna factors, spread by bilby's sky-dependent ones (a batch of 512: 1.6 to 47, median "
    "13); the third inference parameter is luminosity_distance instead of snr.",
    "Phase: the toy draws a phase per sample and rotates (h_plus, h_cross); Dingo's chain has no such "
    "transform (its phase is intrinsic), so `phase` is added to Dingo's extrinsic prior and a small "
    "transform (RotatePhase, this script) rotates the polarisations before ProjectOntoDetectors.",
    "Frequencies: Dingo's UniformFrequencyDomain runs from 0 Hz with zeros below f_min; "
    "RepackageStrainsAndASDS crops at min_idx, giving the toy's bins exactly.",
    "Noise ASD: Dingo's ASDDataset holds the fiducial ASD alone (stage_0 trains on it), written to an HDF5 "
    "file for set_train_transforms.",
    "Network batch: in the workers (collate_fn) Dingo's default collation, then the waveform's real and "
    "imaginary channels (its 1/ASD channel dropped: the stagewise embedding takes 2) standardised by "
    "stagewise's trafo as our batch maker does; labels are Dingo's standardised inference parameters; "
    "ASD features are zeros (as stage_0's fiducial ASD gives ours).",
    "DataLoader: as Dingo's build_train_and_test_loaders (shuffled, worker_init_fn=fix_random_seeds) but "
    "without pin_memory (no GPU) and with the training split's events directly (no random_split).",
]
ADAPTED_TIME = {
    False: "Arrival time: geocent_time fixed at 0 (DeltaFunction), as the toy's.",
    True: "Arrival time (GNPE): geocent_time drawn from the toy's time prior (about ref_time) and Dingo's "
          "GNPECoalescenceTimes (exact_equiv True) with stagewise's gnpe.kernel as its uniform kernel. Dingo "
          "draws a proxy per detector and moves each detector's strain by its own -eps in ProjectOntoDetectors, "
          "where stagewise draws one proxy t_hat and moves both detectors' data by -t_hat. Dingo's time label "
          "is geocent_time - H1_time_proxy (ours time - t_hat; Dingo's includes bilby's H1 sky delay), "
          "standardised as set_train_transforms does. Dingo's context parameters (the relative proxy "
          "L1_time_proxy_relative, on which Dingo's network is conditioned) are made and dropped in "
          "collate_fn: the stagewise network takes no context (its one proxy leaves nothing to condition on).",
}


class RotatePhase:
    """The toy's phase rotation on Dingo's batched sample dict: h+ <- cos h+ - sin hx, hx <- sin h+ + cos hx."""

    def __call__(self, sample):
        phase = sample["extrinsic_parameters"]["phase"][:, None]
        cos, sin = np.cos(phase), np.sin(phase)
        plus, cross = sample["waveform"]["h_plus"], sample["waveform"]["h_cross"]
        return {**sample, "waveform": {"h_plus": cos * plus - sin * cross, "h_cross": sin * plus + cos * cross}}


class ToNetworkBatch:
    """collate_fn: Dingo's default collation, then the (labels, inputs, asd features) of recipe.train_step."""

    def __init__(self, trafo, num_detectors, num_bins, num_asd_features):
        self.trafo, self.shape, self.num_asd_features = trafo, (num_detectors, 3, num_bins), num_asd_features

    def __call__(self, samples):
        parameters, waveform, *_ = default_collate(samples)  # with GNPE Dingo's proxies (context) come last
        assert tuple(waveform.shape[1:]) == self.shape, waveform.shape
        return (parameters, self.trafo.inputs_to_network(waveform[:, :, :2]),
                torch.zeros(len(parameters), self.num_asd_features))


def dingo_dataset(training, folder, config):
    """The training split's polarisations as a Dingo WaveformDataset with Dingo's training transforms: with
    GNPE as config `gnpe` has it, geocent_time drawn from config's time prior."""
    simulator = training.source.simulator
    frequencies = simulator.frequencies.cpu().numpy()
    delta_f = float(frequencies[1] - frequencies[0])
    domain = {"type": "UniformFrequencyDomain", "f_min": float(frequencies[0]), "f_max": float(frequencies[-1]),
              "delta_f": delta_f}
    first = int(round(frequencies[0] / delta_f))
    assert np.allclose(delta_f * (first + np.arange(len(frequencies))), frequencies)
    detectors = simulator.detectors
    asd = simulator.fiducial_asd.cpu().numpy().astype(np.float64)  # (D, F)
    h_plus, h_cross = (training.bank.data[k].cpu().numpy() for k in ("h_plus", "h_cross"))
    strain = (detectors.antenna_plus.numpy()[None, :, None] * h_plus[:, None]
              + detectors.antenna_cross.numpy()[None, :, None] * h_cross[:, None])
    noise_std = 1 / np.sqrt(4 * delta_f)  # Dingo's domain.noise_std: its whitening divides by ASD * noise_std
    scale = (noise_std / np.sqrt((np.abs(strain / asd) ** 2).sum(axis=(1, 2))))[:, None]

    def padded(values):
        return np.concatenate((np.zeros((len(values), first), values.dtype), values), axis=1)

    polarizations = {k: padded(v * scale).astype(np.complex64) for k, v in (("h_plus", h_plus), ("h_cross", h_cross))}
    labels = {k: v.cpu().numpy() for k, v in training.bank.labels.items()}
    parameters = pd.DataFrame({**labels, "luminosity_distance": D_REF, "geocent_time": 0.0}).astype(np.float32)
    names = detectors.names
    asd_path = folder / "dingo_asd_dataset.h5"
    with contextlib.redirect_stdout(sys.stderr):  # Dingo prints progress; stdout is for the JSON
        ASDDataset(dictionary={"settings": {"domain_dict": domain}, "asds": {d: padded(asd[i:i + 1])
                                                                             for i, d in enumerate(names)},
                               "gps_times": {d: np.zeros(1) for d in names}}).to_file(asd_path)
        wfd = WaveformDataset(dictionary={"settings": {"domain": domain}, "parameters": parameters,
                                          "polarizations": polarizations}, precision="single")
        uniform = "bilby.core.prior.Uniform(minimum={}, maximum={}, name='{}')"
        time_prior = config["extrinsic_prior"]["time"]
        geocent_time = (f"bilby.core.prior.DeltaFunction(peak={time_prior['value']}, name='geocent_time')"
                        if time_prior["distribution"] == "fixed"
                        else uniform.format(time_prior["low"], time_prior["high"], "geocent_time"))
        data_settings = {"detectors": names, "ref_time": REF_TIME,
                         "inference_parameters": [n for n in training.trafo.names if n in labels]
                         + ["luminosity_distance"] + (["geocent_time"] if "time" in training.trafo.names else []),
                         "extrinsic_prior": {"dec": "default", "ra": "default", "psi": "default",
                                             "geocent_time": geocent_time,
                                             "luminosity_distance": uniform.format(D_MIN, D_MAX, "luminosity_distance"),
                                             "phase": uniform.format(0.0, 2 * np.pi, "phase")}}
        if config["gnpe"] is not None:
            kernel = config["gnpe"]["kernel"]
            data_settings["gnpe_time_shifts"] = {
                "kernel": f"bilby.core.prior.Uniform(minimum={-kernel}, maximum={kernel})", "exact_equiv": True}
        set_train_transforms(wfd, data_settings, str(asd_path), print_output=False)
    chain = wfd.transform.transforms
    project = next(i for i, t in enumerate(chain) if isinstance(t, ProjectOntoDetectors))
    chain.insert(project, RotatePhase())
    return wfd, data_settings


def network_batch(training):
    """The collate_fn that makes Dingo's samples the batches of `training`'s model."""
    simulator = training.source.simulator
    return ToNetworkBatch(training.trafo, len(simulator.detectors.names), len(simulator.frequencies),
                          simulator.num_asd_features)


def dingo_loader(wfd, training, batches, seed):
    """Dingo's training DataLoader over `batches` batches of the dataset, with WORKERS workers."""
    sampler = RandomSampler(wfd, num_samples=batches * training.batch_size,
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(wfd, batch_size=training.batch_size, sampler=sampler, num_workers=WORKERS,
                      worker_init_fn=fix_random_seeds, collate_fn=network_batch(training), persistent_workers=False)


def dingo_steps_per_second(training, wfd, seed, expected):
    """Steps/s of bench.STEPS training steps fed by Dingo's workers, after their first 2 batches (start-up)."""
    batches = iter(dingo_loader(wfd, training, bench.STEPS + 2, seed))
    for _ in range(2):
        first = next(batches)
        assert [tuple(t.shape) for t in first] == expected, ([tuple(t.shape) for t in first], expected)
    rate = training.steps_per_second(itertools.islice(batches, bench.STEPS))
    del batches  # shuts the workers down, outside the timing
    return rate


def vs_dingo_figure(repeats, gnpe=False):
    """(vs_dingo, or with `gnpe` vs_dingo_gnpe) samples/s of our full training steps over those fed by Dingo's
    transforms and workers: (spread of the ratios, details)."""
    name = "vs_dingo_gnpe" if gnpe else "vs_dingo"
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        config = bench.default_config(fixed_time=not gnpe)
        started = time.perf_counter()
        files = bench.prepare(folder, config)
        training = bench.Training(config, files, "cpu")
        assert training.source.simulator.gnpe_kernel == (config["gnpe"] or {}).get("kernel")  # our batches align
        wfd, data_settings = dingo_dataset(training, folder, config)
        setup_seconds = time.perf_counter() - started
        training.steps_per_second(training.batches(2))  # warm-up
        expected = [tuple(t.shape) for t in training.batches(1)[0]]
        samples = wfd.__getitems__(list(range(training.batch_size)))  # one batch of Dingo's, in this process
        shapes = [tuple(t.shape) for t in network_batch(training)(samples)]
        assert shapes == expected, (shapes, expected)
        chain = " -> ".join(type(t).__name__ for t in wfd.transform.transforms)
        log.info("%s: Dingo chain %s; Dingo's batch %s (inference_parameters, waveform, context %s) -> network "
                 "batch shapes %s, ours the same", name, chain, [tuple(t.shape) for t in default_collate(samples)],
                 data_settings["context_parameters"], shapes)
        ratios, ours, theirs = [], [], []
        for repeat in range(repeats):
            ours.append(training.steps_per_second(training.full_steps(100 + repeat)) * training.batch_size)
            theirs.append(dingo_steps_per_second(training, wfd, repeat, expected) * training.batch_size)
            ratios.append(ours[-1] / theirs[-1])
            log.info("%s repeat %d: ours %.0f samples/s, Dingo %.0f samples/s", name, repeat, ours[-1], theirs[-1])
    return bench.spread(ratios), {
        "batch_size": training.batch_size, "steps_timed": bench.STEPS, "repeats": repeats,
        "ours_samples_per_second": bench.spread(ours), "dingo_samples_per_second": bench.spread(theirs),
        "threads": f"training process: {torch.get_num_threads()} torch threads (both sides); Dingo: {WORKERS} "
                   "DataLoader workers besides (1 torch thread each), the first 2 batches (start-up) not timed",
        "arrival_time": f"free, GNPE kernel {config['gnpe']['kernel']} s" if gnpe else "fixed at 0",
        "dingo_chain": [type(t).__name__ for t in wfd.transform.transforms],
        "inference_parameters": data_settings["inference_parameters"],
        "dingo_context_parameters_dropped": data_settings["context_parameters"],
        "asd_features": "zeros (fiducial ASD)", "batch_shapes": expected,
        "adapted": ADAPTED + [ADAPTED_TIME[gnpe]], "setup_seconds": setup_seconds,
        "versions": {p: version(p) for p in ("dingo-gw", "bilby", "torch")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(os.cpu_count())
    results, details = {"machine": bench.machine()}, {}
    for name, gnpe in FIGURES.items():
        started = time.perf_counter()
        results[name], details[name] = vs_dingo_figure(args.repeats, gnpe)
        details[name]["seconds"] = time.perf_counter() - started
    print(json.dumps({**results, "details": details}, indent=2))


if __name__ == "__main__":
    main()
