"""What every step of a run shares: the frequency grid, detectors, priors, ASDs and the simulator."""

from pathlib import Path

from .config import check_stage
from .events import read_frequencies
from .priors import make_priors


def observations(config):
    return config["data"]["kind"] == "observations"


def is_regression(config):
    """The TensorFlow backend (Keras Gaussian regression) instead of the torch flow."""
    return config["model"]["type"] == "gaussian_regression"


def intrinsic_names(config):
    """Inference parameters read from the event files as labels: all of them for observations,
    those without an extrinsic prior for signals."""
    if observations(config):
        return list(config["inference_parameters"])
    return [p for p in config["inference_parameters"] if p not in config["extrinsic_prior"]]


def prior_specs(config):
    """Config entries of the priors an inference parameter can have: the label priors
    (`intrinsic_prior`) for observations, `intrinsic_prior` and `extrinsic_prior` for signals."""
    if observations(config):
        return config["intrinsic_prior"]
    return {**config["intrinsic_prior"], **config["extrinsic_prior"]}


def label_priors(config):
    """{name: Prior} of the labels that the event files must hold."""
    specs = prior_specs(config)
    return make_priors({name: specs[name] for name in intrinsic_names(config)})


def make_simulator(config, event_file, fiducial_asd_file, asd_set_file=None, device="cpu", num_asd_bands=1):
    """The StrainSimulator of this config; ASDs are checked against the event file's frequencies.

    num_asd_bands only shapes the ASD features, which the trafo and SVD steps do not use."""
    import torch  # here, not at the top: checking a config (at every snakemake start) needs no torch

    from .data import StrainSimulator
    from .detectors import Detectors, read_asd_file

    frequencies = read_frequencies(event_file)
    detectors = Detectors(config["detectors"])
    fiducial = read_asd_file(fiducial_asd_file, detectors.names, frequencies)[0]
    asd_set = None if asd_set_file is None else read_asd_file(asd_set_file, detectors.names, frequencies)
    priors = make_priors(config["extrinsic_prior"])
    return StrainSimulator(frequencies, detectors, priors, fiducial, asd_set,
                           num_asd_bands, torch.device(device))


def check_config(config):
    """What the schema cannot say: priors are valid, each inference parameter has one, log labels
    are inference parameters, stages are numbered 0, 1, ..., the simulation fits the detectors."""
    known = prior_specs(config)
    make_priors(known)
    for name in config["inference_parameters"]:
        if name not in known:
            where = ("has no prior in intrinsic_prior (the label priors of observations)" if observations(config)
                     else "is in neither intrinsic_prior nor extrinsic_prior")
            raise ValueError(f"inference_parameters: '{name}' {where}")
        if known[name]["distribution"] == "fixed":
            raise ValueError(f"inference_parameters: '{name}' has a fixed prior and cannot be inferred")
    for name in config["trafo"]["log_labels"]:
        if name not in config["inference_parameters"]:
            raise ValueError(f"trafo.log_labels: '{name}' is not an inference parameter")
    expected = [f"stage_{i}" for i in range(len(config["training"]))]
    if sorted(config["training"], key=lambda s: int(s.split("_")[1])) != expected:
        raise ValueError(f"training: stages must be named {', '.join(expected)}; found {', '.join(config['training'])}")
    if config["run"] in config["evaluation"]["compare_runs"]:
        raise ValueError(f"evaluation.compare_runs: '{config['run']}' is this run; name other runs")
    if is_regression(config):
        check_regression_config(config)
    for name, stage in config["training"].items():
        check_stage(name, stage)
        if stage["warm_start"] is not None:
            if name != "stage_0":
                raise ValueError(f"training.{name}.warm_start: only stage_0 can warm-start; later stages start "
                                 "from the previous stage's model")
            if not Path(stage["warm_start"]).is_file():
                raise ValueError(f"training.stage_0.warm_start: file not found: {stage['warm_start']}")
    if 2 * config["data"]["shuffle"]["buffer_mb"] > config["local"]["memory_limit_mb"]:
        raise ValueError(f"data.shuffle.buffer_mb: {config['data']['shuffle']['buffer_mb']} MB must be at most half "
                         f"of local.memory_limit_mb ({config['local']['memory_limit_mb']} MB): streaming holds up "
                         "to two buffers")
    if observations(config):
        check_observations_config(config)
    elif config["svd"] is None:
        raise ValueError("svd: null is for observations only; signals need the SVD basis")
    elif config["trafo"]["log_inputs"]:
        raise ValueError("trafo.log_inputs: whitened strain has negative values; log inputs are for observations")
    if config["data"]["simulate"]:
        simulation = config["simulation"]
        levels, detectors = simulation["asd"]["levels"], list(config["detectors"])
        if len(levels) != len(detectors):
            raise ValueError(f"simulation.asd.levels: {len(levels)} level(s) for {len(detectors)} detectors {detectors}")
        if simulation["frequencies"]["f_max"] <= simulation["frequencies"]["f_min"]:
            raise ValueError("simulation.frequencies: f_max must be above f_min")
        missing = {"f0", "tau"} - set(config["intrinsic_prior"])
        if missing:
            raise ValueError(f"intrinsic_prior: the simulated ringdowns need priors for {sorted(missing)}")


def label_weights(config):
    """Loss weight per inference parameter (gaussian_regression): `label_weight_dict` entries, else
    `label_weight_initialization`."""
    model = config["model"]
    return [model["label_weight_dict"].get(name, model["label_weight_initialization"])
            for name in config["inference_parameters"]]


def check_regression_config(config):
    """Label weights name inference parameters and leave at least one label in the loss; the flow-only
    stage keys are not set."""
    model = config["model"]
    for name in model["label_weight_dict"]:
        if name not in config["inference_parameters"]:
            raise ValueError(f"model.label_weight_dict: '{name}' is not an inference parameter")
    if not any(w > 0 for w in label_weights(config)):
        raise ValueError("model.label_weight_dict: every label has weight 0; at least one must count in the loss")
    for name, stage in config["training"].items():
        for key in ("ema_decay", "warm_start"):
            if stage[key] is not None:
                raise ValueError(f"training.{name}.{key}: not available for model.type gaussian_regression "
                                 "(flow models only)")


def check_observations_config(config):
    if config["data"]["simulate"]:
        raise ValueError("data.simulate: the simulated toy problem is made of signals; set data.kind: signals "
                         "or data.simulate: false")
    if config["svd"] is None:
        for stage, settings in config["training"].items():
            if settings["freeze_svd"]:
                raise ValueError(f"training.{stage}.freeze_svd: there is no SVD layer to freeze (svd is null)")
