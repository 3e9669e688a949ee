"""Settings: the config schema, every check of a config, the subset of settings each step's
output depends on (its fingerprint), and the typed view of the problem that the steps share.

Every config error comes from `validate`, which the workflow calls when Snakemake reads the
config; the library's functions trust the settings they are given.
"""

import functools
import glob
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .priors import Prior, make_priors

Settings = dict[str, Any]  # a config, or the subset of one that a step reads

# The event-file splits, in the order count_events lists them.
SPLITS = ("training", "trafo", "validation", "test")
# The arguments each optimizer and scheduler takes besides `type` (and learning_rate, warmup_epochs).
OPTIMIZER_ARGUMENTS = {
    "adam": {"betas", "eps", "weight_decay", "amsgrad"},
    "adamw": {"betas", "eps", "weight_decay", "amsgrad"},
    "sgd": {"momentum", "dampening", "weight_decay", "nesterov"},
}
SCHEDULER_ARGUMENTS = {
    "constant": set(),
    "cosine": {"min_factor"},
    "step": {"step_size", "gamma"},
    "exponential": {"gamma"},
    "reduce_on_plateau": {"factor", "patience", "threshold"},
}


@functools.cache
def schema() -> Settings:
    """The config schema (package data, so that an installed package finds it)."""
    return yaml.safe_load(resources.files("stagewise").joinpath("config.schema.yaml").read_text())


def schema_error(instance: Any, spec: Settings) -> str | None:
    """None, or one line "<key>: <problem>" for the first way `instance` breaks `spec`."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(spec).iter_errors(instance))
    if error is None:
        return None
    key = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    return f"{key}: {error.message}"


def validate(config: Settings) -> None:
    """Check `config` completely (the schema, then what the schema cannot say) and fill in the
    defaults of the stages' optional keys; ValueError with one line naming the key otherwise."""
    for key in ("gnpe", "training_seed", "sweep"):  # optional keys of older configs
        config.setdefault(key, None)
    error = schema_error(config, schema())
    if error is not None:
        raise ValueError(f"config key {error} (schema {resources.files('stagewise') / 'config.schema.yaml'})")
    for stage in config["training"].values():
        fill_stage_defaults(stage)
    if config["gnpe"] is not None:
        fill_stage_defaults(config["gnpe"]["init"]["training"])
        _schema_order(config["gnpe"], schema()["properties"]["gnpe"])  # a section that a later file replaced whole
    check_problem(config)
    check_training(config)
    check_data(config)
    check_gnpe(config)
    check_sample_budgets(config)


def stage_from_file(path: str | Path) -> Settings:
    """One stage's settings from YAML file `path`, checked against the schema, defaults filled."""
    try:
        settings = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read stage settings ({' '.join(str(err).split())})") from None
    error = schema_error(settings, {**schema()["$defs"]["stage"], "$defs": schema()["$defs"]})
    if error is None:
        try:
            check_stage("stage", settings)
        except ValueError as err:
            error = str(err).removeprefix("training.stage.")
    if error is not None:
        raise ValueError(f"{path}: stage setting {error}")
    fill_stage_defaults(settings)
    return settings


def fill_stage_defaults(stage: Settings) -> None:
    """Set the optional keys of one stage's settings (and of its early_stopping) to their schema defaults,
    and put every key in the schema's order: Snakemake compares the params of two runs as text, so the
    same settings from differently ordered files must read the same."""
    node = schema()["$defs"]["stage"]
    for key, spec in node["properties"].items():
        if "default" in spec:
            stage.setdefault(key, spec["default"])
    if stage.get("early_stopping") is not None:
        for key, spec in _object_branch(node["properties"]["early_stopping"])["properties"].items():
            if "default" in spec:
                stage["early_stopping"].setdefault(key, spec["default"])
    _schema_order(stage, node)


def scheduler_with_defaults(scheduler: Settings) -> Settings:
    """A stage's scheduler settings with the schema's defaults of its type's arguments filled in.

    Not written into the stage settings: fingerprints of configs that leave them out stay as they were."""
    properties = schema()["$defs"]["stage"]["properties"]["scheduler"]["properties"]
    defaults = {key: properties[key]["default"] for key in SCHEDULER_ARGUMENTS[scheduler["type"]]}
    return {"warmup_epochs": properties["warmup_epochs"]["default"], **defaults, **scheduler}


def _object_branch(spec: Settings) -> Settings:
    """The object schema of `spec`: its `$ref` (to `$defs`) resolved, the object branch of a oneOf."""
    if "$ref" in spec:
        spec = schema()["$defs"][spec["$ref"].rsplit("/", 1)[-1]]
    return next((b for b in spec.get("oneOf", []) if b.get("type") == "object"), spec)


def _schema_order(mapping: Settings, spec: Settings) -> None:
    """Reorder `mapping` (in place, recursively) as the schema lists its properties."""
    properties = _object_branch(spec).get("properties", {})
    ordered = {key: mapping[key] for key in properties if key in mapping}
    mapping.clear()
    mapping.update(ordered)
    for key, value in mapping.items():
        if isinstance(value, dict):
            _schema_order(value, properties[key])


def check_problem(config: Settings) -> None:
    """Priors are valid, each inference parameter has one that is not fixed, log labels are inference
    parameters, the simulation fits the detectors."""
    problem = Problem.from_settings(config)
    make_priors(problem.priors)
    for name in problem.inference_parameters:
        if name not in problem.priors:
            where = ("has no prior in intrinsic_prior (the label priors of observations)" if problem.observations
                     else "is in neither intrinsic_prior nor extrinsic_prior")
            raise ValueError(f"inference_parameters: '{name}' {where}")
        if problem.priors[name]["distribution"] == "fixed":
            raise ValueError(f"inference_parameters: '{name}' has a fixed prior and cannot be inferred")
    for name in config["trafo"]["log_labels"]:
        if name not in problem.inference_parameters:
            raise ValueError(f"trafo.log_labels: '{name}' is not an inference parameter")
    if config["run"] in config["evaluation"]["compare_runs"]:
        raise ValueError(f"evaluation.compare_runs: '{config['run']}' is this run; name other runs")
    if config["data"]["simulate"]:
        simulation = config["simulation"]
        levels, detectors = simulation["asd"]["levels"], list(config["detectors"])
        if len(levels) != len(detectors):
            raise ValueError(f"simulation.asd.levels: {len(levels)} level(s) for {len(detectors)} detectors "
                             f"{detectors}")
        if simulation["frequencies"]["f_max"] <= simulation["frequencies"]["f_min"]:
            raise ValueError("simulation.frequencies: f_max must be above f_min")
        missing = {"f0", "tau"} - set(config["intrinsic_prior"])
        if missing:
            raise ValueError(f"intrinsic_prior: the simulated ringdowns need priors for {sorted(missing)}")


def check_training(config: Settings) -> None:
    """Stages are numbered 0, 1, ... and their optimizer and scheduler arguments fit their types; the
    model type's own rules (label weights, flow-only keys)."""
    expected = [f"stage_{i}" for i in range(len(config["training"]))]
    if stage_names(config) != expected:
        raise ValueError(f"training: stages must be named {', '.join(expected)}; found {', '.join(config['training'])}")
    for name, stage in config["training"].items():
        check_stage(name, stage)
        if stage["warm_start"] is not None:
            if name != "stage_0":
                raise ValueError(f"training.{name}.warm_start: only stage_0 can warm-start; later stages start "
                                 "from the previous stage's model")
            if not Path(stage["warm_start"]).is_file():
                raise ValueError(f"training.stage_0.warm_start: file not found: {stage['warm_start']}")
    if is_regression(config):
        check_regression(config)


def check_stage(name: str, settings: Settings) -> None:
    """ValueError naming the key when an optimizer or scheduler argument does not belong to its type,
    or the warm-up is not shorter than the stage."""
    for section, allowed, skip in (("optimizer", OPTIMIZER_ARGUMENTS, {"type", "learning_rate"}),
                                   ("scheduler", SCHEDULER_ARGUMENTS, {"type", "warmup_epochs"})):
        kind = settings[section]["type"]
        for key in sorted(set(settings[section]) - skip - allowed[kind]):
            raise ValueError(f"training.{name}.{section}.{key}: not an argument of {section} type '{kind}' "
                             f"(it takes {', '.join(sorted(allowed[kind])) or 'none'})")
    warmup = settings["scheduler"].get("warmup_epochs", 0)
    if warmup >= settings["epochs"]:
        raise ValueError(f"training.{name}.scheduler.warmup_epochs: {warmup} must be below epochs "
                         f"({settings['epochs']})")


def check_regression(config: Settings) -> None:
    """Label weights name inference parameters and leave at least one label in the loss; the flow-only
    stage keys and the optimizer arguments Keras lacks are not set."""
    model = config["model"]
    for name in model["label_weight_dict"]:
        if name not in config["inference_parameters"]:
            raise ValueError(f"model.label_weight_dict: '{name}' is not an inference parameter")
    if not any(w > 0 for w in label_weights(model, config["inference_parameters"])):
        raise ValueError("model.label_weight_dict: every label has weight 0; at least one must count in the loss")
    for name, stage in config["training"].items():
        for key in ("ema_decay", "warm_start"):
            if stage[key] is not None:
                raise ValueError(f"training.{name}.{key}: not available for model.type gaussian_regression "
                                 "(flow models only)")
        if "dampening" in stage["optimizer"]:
            raise ValueError(f"training.{name}.optimizer.dampening: Keras' SGD has no dampening "
                             "(model.type gaussian_regression)")
    if rank_count(config["local"]) > 1:
        key = "training_job.gpus" if config["local"]["device"].startswith("cuda") else "cpu_processes"
        raise ValueError(f"local.{key}: {rank_count(config['local'])} processes, but model.type gaussian_regression "
                         "trains on one (data-parallel training is for the torch flow)")


def check_gnpe(config: Settings) -> None:
    """GNPE aligns signals in time: the arrival time is inferred, its prior is wider than the kernel, and the
    flow draws the samples; the iteration bounds are ordered."""
    gnpe = config["gnpe"]
    if gnpe is None:
        return
    if config["data"]["kind"] != "signals":
        raise ValueError("gnpe: aligns signals in time; set gnpe: null for observations")
    if is_regression(config):
        raise ValueError("gnpe: needs model.type flow (Gibbs sampling draws from the posterior)")
    if "time" not in config["inference_parameters"]:
        raise ValueError("gnpe: 'time' must be in inference_parameters (GNPE infers the arrival time)")
    prior = config["extrinsic_prior"].get("time", {})
    width = prior.get("high", 0.0) - prior.get("low", 0.0) if prior.get("distribution") == "uniform" else 0.0
    if not gnpe["kernel"] < width / 2:
        raise ValueError(f"gnpe.kernel: {gnpe['kernel']} s must be below half the width of extrinsic_prior.time "
                         "(a uniform prior)")
    if gnpe["init"]["training"]["freeze_svd"]:
        raise ValueError("gnpe.init.training.freeze_svd: the init network has no SVD layer (its basis would not "
                         "fit unaligned signals): set it to false")
    iterations = gnpe["iterations"]
    if iterations["min"] > iterations["max"]:
        raise ValueError(f"gnpe.iterations.min: {iterations['min']} exceeds max ({iterations['max']})")


def check_sample_budgets(config: Settings) -> None:
    """Importance sampling draws at least one batch of num_samples: max_samples is not below it."""
    for section in ("evaluation", "inference"):
        budget = config[section]
        if budget["effective_samples"] is not None and budget["max_samples"] < budget["num_samples"]:
            raise ValueError(f"{section}.max_samples: {budget['max_samples']} is below {section}.num_samples "
                             f"({budget['num_samples']}), the size of one batch")


def check_data(config: Settings) -> None:
    """The kind of data fits the SVD and trafo settings; streaming fits the memory limit."""
    data = config["data"]
    if 2 * data["shuffle"]["buffer_mb"] > config["local"]["memory_limit_mb"]:
        raise ValueError(f"data.shuffle.buffer_mb: {data['shuffle']['buffer_mb']} MB must be at most half "
                         f"of local.memory_limit_mb ({config['local']['memory_limit_mb']} MB): streaming holds up "
                         "to two buffers")
    if data["kind"] == "signals":
        if config["svd"] is None:
            raise ValueError("svd: null is for observations only; signals need the SVD basis")
        if config["trafo"]["log_inputs"]:
            raise ValueError("trafo.log_inputs: whitened strain has negative values; log inputs are for observations")
        return
    if data["simulate"]:
        raise ValueError("data.simulate: the simulated toy problem is made of signals; set data.kind: signals "
                         "or data.simulate: false")
    if config["svd"] is None:
        for stage, settings in config["training"].items():
            if settings["freeze_svd"]:
                raise ValueError(f"training.{stage}.freeze_svd: there is no SVD layer to freeze (svd is null)")


@dataclass(frozen=True)
class Problem:
    """What the steps after `simulate` share: the kind of data, the parameters to infer and their priors.

    Built from any step's settings subset (config.*_settings): a section the subset leaves out
    is empty here, and the step does not use it."""

    observations: bool  # data.kind: observations (ready network inputs), else signals plus noise
    simulated: bool  # the embedded toy problem (data.simulate)
    seed: int | None
    inference_parameters: tuple[str, ...]
    priors: Settings  # {name: prior spec} of every parameter that can be inferred
    extrinsic_prior: Settings  # signals: drawn for every sample, never read from the files
    detectors: Settings
    gnpe_kernel: float | None  # GNPE: the half-width (s) of the proxies' uniform kernel; None without GNPE

    @classmethod
    def from_settings(cls, settings: Settings) -> "Problem":
        observations = settings["data"]["kind"] == "observations"
        extrinsic = {} if observations else settings.get("extrinsic_prior", {})
        return cls(observations, settings["data"]["simulate"], settings.get("seed"),
                   tuple(settings["inference_parameters"]), {**settings.get("intrinsic_prior", {}), **extrinsic},
                   extrinsic, settings.get("detectors", {}), (settings.get("gnpe") or {}).get("kernel"))

    @property
    def label_names(self) -> list[str]:
        """The inference parameters read from the event files as labels: all of them for observations,
        those without an extrinsic prior for signals."""
        return [p for p in self.inference_parameters if p not in self.extrinsic_prior]

    def label_priors(self) -> dict[str, Prior]:
        """{name: Prior} of the labels that the event files must hold."""
        return make_priors({name: self.priors[name] for name in self.label_names})


def rank_count(local: Settings) -> int:
    """The processes (ranks) of a training job: training_job.gpus on a CUDA device, cpu_processes on the CPU."""
    if local["device"].startswith("cuda"):
        return max(1, local["training_job"]["gpus"])
    return local["cpu_processes"]


def is_regression(config: Settings) -> bool:
    """The TensorFlow backend (Keras Gaussian regression) instead of the torch flow."""
    return config["model"]["type"] == "gaussian_regression"


def label_weights(model: Settings, inference_parameters: list[str] | tuple[str, ...]) -> list[float]:
    """Loss weight per inference parameter (gaussian_regression): model.label_weight_dict entries,
    else model.label_weight_initialization."""
    return [model["label_weight_dict"].get(name, model["label_weight_initialization"]) for name in inference_parameters]


def stage_index(name: str) -> int:
    """1 for "stage_1"."""
    return int(name.split("_")[1])


def stage_names(config: Settings) -> list[str]:
    """The config's stages in training order."""
    return sorted(config["training"], key=stage_index)


def svd_names(config: Settings) -> list[str]:
    """One SVD basis per detector for signals, one of the inputs for observations, none with svd: null."""
    if config["svd"] is None:
        return []
    return ["inputs"] if config["data"]["kind"] == "observations" else list(config["detectors"])


def canonical_json(settings: Settings) -> str:
    """JSON text of `settings` with sorted keys, the same for equal settings."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings: Settings, input_files: list[str] | tuple[str, ...] = ()) -> str:
    """A short hash of `settings` and of the contents of `input_files`.

    Two fingerprints are equal only when the settings are equal and every input
    file has the same bytes: a checkpoint made from other settings or other
    upstream artefacts never matches.
    """
    digest = hashlib.sha256(canonical_json(settings).encode())
    for path in input_files:
        digest.update(file_digest(path).encode())
    return digest.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The settings that decide each step's output: Snakemake's `params:` of each rule and
# the checkpoint fingerprints use exactly these, so a change reruns what it touches.
# The library functions read only these subsets (and, where a step runs on a device, `local`).
PROBLEM_KEYS = ("seed", "detectors", "extrinsic_prior", "inference_parameters")


INIT_STAGE = "init"  # GNPE: the network of the initial time proxies, trained as a stage of this name


def _gnpe(config: Settings, *keys: str) -> Settings:
    """{"gnpe": the named keys of config `gnpe`}, or nothing without GNPE (fingerprints stay as before)."""
    return {} if config.get("gnpe") is None else {"gnpe": {key: config["gnpe"][key] for key in keys}}


def _pick(config: Settings, keys: tuple[str, ...]) -> Settings:
    """The named sections, plus the kind of data (and whether it is simulated), which every step after
    `simulate` reads."""
    data = {"data": {"kind": config["data"]["kind"], "simulate": config["data"]["simulate"]}}
    return data | {key: config[key] for key in keys}


def count_settings(config: Settings) -> Settings:
    """The labels count_events checks (those the event files hold) and their priors, nothing more: a change
    elsewhere (an extrinsic prior, an inferred extrinsic parameter) must not rerun it, since Snakemake then
    plans no step below it for that change (fit_trafo takes counts.yaml as an ancient() input)."""
    labels = Problem.from_settings(config).label_names
    return _pick(config, ()) | {"inference_parameters": labels,
                                "intrinsic_prior": {name: config["intrinsic_prior"][name] for name in labels}}


def simulation_settings(config: Settings) -> Settings:
    return {key: config[key] for key in ("seed", "simulation", "intrinsic_prior", "detectors")}


def trafo_settings(config: Settings) -> Settings:
    return _pick(config, (*PROBLEM_KEYS, "trafo")) | _gnpe(config, "kernel")


def svd_settings(config: Settings) -> Settings:
    return _pick(config, (*PROBLEM_KEYS, "svd")) | _gnpe(config, "kernel")


def _training_seed(settings: Settings, config: Settings) -> Settings:
    """A training step's settings with `seed` replaced by the config's training_seed where one is set."""
    if config.get("training_seed") is not None:
        settings["seed"] = config["training_seed"]
    return settings


def stage_settings(config: Settings, stage: str) -> Settings:
    settings = _pick(config, (*PROBLEM_KEYS, "model")) | {"training": {stage: config["training"][stage]}}
    settings["data"]["shuffle"] = config["data"]["shuffle"]
    return _training_seed(settings, config) | _gnpe(config, "kernel")


def init_settings(config: Settings) -> Settings:
    """GNPE's init network as a stage of its own: it infers the arrival time alone from the data as
    measured (no proxies), with gnpe.init's embedding, flow and training, and no SVD layer (the basis
    is fitted to aligned signals)."""
    init = config["gnpe"]["init"]
    settings = _pick(config, PROBLEM_KEYS) | {
        "inference_parameters": ["time"], "model": {**config["model"], "embedding": init["embedding"],
                                                    "flow": init["flow"]},
        "training": {INIT_STAGE: init["training"]}}
    settings["data"]["shuffle"] = config["data"]["shuffle"]
    return _training_seed(settings, config)


def evaluation_settings(config: Settings) -> Settings:
    return _pick(config, (*PROBLEM_KEYS, "intrinsic_prior", "model", "training", "evaluation")) | _gnpe(
        config, "kernel", "iterations")


def resolve_file(path: str | None, key: str) -> str:
    """`path` checked to be an existing file; an error names the config key `key` (e.g. data.asd_set_file)
    otherwise."""
    if path is None:
        raise ValueError(f"{key}: no file given (the path of one HDF5 file)")
    if not Path(path).is_file():
        raise ValueError(f"{key}: file not found: {path}")
    return str(path)


def resolve_files(spec: str | list[str] | None, key: str) -> list[str]:
    """A sorted list of paths from a glob pattern or a list; an empty result is an error naming `key`."""
    if spec is None:
        raise ValueError(f"{key}: no files given (a glob pattern or a list of paths)")
    if isinstance(spec, str):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise ValueError(f"{key}: the pattern '{spec}' matches no file")
        return paths
    missing = [p for p in spec if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{key}: file not found: {missing[0]}")
    return list(spec)


INFERENCE_KEYS = ("num_samples", "effective_samples", "max_samples", "importance_sampling", "events_per_batch",
                  "num_plot_events")
SIMULATED_SET = "simulated"  # the observed set that data.simulate writes (inference.simulated_events)


def inference_settings(config: Settings) -> Settings:
    """The keys that shape each set's posterior.h5 (not `sets`: a set's files are its rule's input), and
    with GNPE the bounds of its Gibbs iterations."""
    return {key: config["inference"][key] for key in INFERENCE_KEYS} | (
        {} if config.get("gnpe") is None else {"gnpe_iterations": config["gnpe"]["iterations"]})


def observed_simulation_settings(config: Settings) -> Settings:
    """What the simulated observed set depends on."""
    return {key: config[key] for key in ("seed", "simulation", "intrinsic_prior", "extrinsic_prior", "detectors")} | {
        "simulated_events": config["inference"]["simulated_events"]}


def inference_sets(config: Settings, simulated_file: str) -> dict[str, list[str]]:
    """{set name: observed-data files} of inference.sets, plus the simulated set when data.simulate
    writes one (at `simulated_file`)."""
    sets = {name: resolve_files(spec, f"inference.sets.{name}") for name, spec in config["inference"]["sets"].items()}
    if config["data"]["simulate"] and config["inference"]["simulated_events"]:
        sets[SIMULATED_SET] = [simulated_file]
    return sets
