"""Settings: fingerprints and the split between model settings and `local` ones."""

import glob
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml


def schema_error(instance, schema):
    """None, or one line "<key>: <problem>" for the first way `instance` breaks `schema`."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(instance))
    if error is None:
        return None
    key = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    return f"{key}: {error.message}"


def validate(config, schema_path):
    """Raise ValueError with one line naming the offending key when `config` breaks the schema;
    then fill in the defaults of the stages' optional keys."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    error = schema_error(config, schema)
    if error is not None:
        raise ValueError(f"config key {error} (schema {schema_path})")
    for stage in config["training"].values():
        fill_stage_defaults(stage, schema)


def fill_stage_defaults(stage, schema):
    """Set the optional keys of one stage's settings (and of its early_stopping) to their schema defaults,
    and put every key in the schema's order: Snakemake compares the params of two runs as text, so the
    same settings from differently ordered files must read the same."""
    node = schema["$defs"]["stage"]
    for key, spec in node["properties"].items():
        if "default" in spec:
            stage.setdefault(key, spec["default"])
    if stage.get("early_stopping") is not None:
        for key, spec in _object_branch(node["properties"]["early_stopping"])["properties"].items():
            if "default" in spec:
                stage["early_stopping"].setdefault(key, spec["default"])
    _schema_order(stage, node)


def _object_branch(spec):
    return next((b for b in spec.get("oneOf", []) if b.get("type") == "object"), spec)


def _schema_order(mapping, spec):
    """Reorder `mapping` (in place, recursively) as the schema lists its properties."""
    properties = _object_branch(spec).get("properties", {})
    ordered = {key: mapping[key] for key in properties if key in mapping}
    mapping.clear()
    mapping.update(ordered)
    for key, value in mapping.items():
        if isinstance(value, dict):
            _schema_order(value, properties[key])


def canonical_json(settings):
    """JSON text of `settings` with sorted keys, the same for equal settings."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings, input_files=()):
    """A short hash of `settings` and of the contents of `input_files`.

    Two fingerprints are equal only when the settings are equal and every input
    file has the same bytes: a checkpoint made from other settings or other
    upstream artefacts never matches.
    """
    digest = hashlib.sha256(canonical_json(settings).encode())
    for path in input_files:
        digest.update(file_digest(path).encode())
    return digest.hexdigest()[:16]


def file_digest(path):
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The settings that decide each step's output: Snakemake's `params:` of each rule and
# the checkpoint fingerprints use exactly these, so a change reruns what it touches.
# The library functions read only these subsets (plus `local`).
PROBLEM_KEYS = ("seed", "detectors", "extrinsic_prior", "inference_parameters")


def _pick(config, keys):
    """The named sections, plus the kind of data (and whether it is simulated), which every step after
    `simulate` reads."""
    data = {"data": {"kind": config["data"]["kind"], "simulate": config["data"]["simulate"]}}
    return data | {key: config[key] for key in keys}


def count_settings(config):
    return _pick(config, ("inference_parameters", "intrinsic_prior", "extrinsic_prior"))


def simulation_settings(config):
    return {key: config[key] for key in ("seed", "simulation", "intrinsic_prior", "detectors")}


def trafo_settings(config):
    return _pick(config, (*PROBLEM_KEYS, "trafo"))


def svd_settings(config):
    return _pick(config, (*PROBLEM_KEYS, "svd"))


def stage_settings(config, stage):
    settings = _pick(config, (*PROBLEM_KEYS, "model")) | {"training": {stage: config["training"][stage]}}
    settings["data"]["shuffle"] = config["data"]["shuffle"]
    return settings


def evaluation_settings(config):
    return _pick(config, (*PROBLEM_KEYS, "intrinsic_prior", "model", "training", "evaluation"))


def resolve_file(path, key):
    """`path` checked to be an existing file; an error names the config key `key` otherwise."""
    if path is None:
        raise ValueError(f"data.{key}: no file given (the path of one HDF5 file)")
    if not Path(path).is_file():
        raise ValueError(f"data.{key}: file not found: {path}")
    return str(path)


def resolve_files(spec, key):
    """A sorted list of paths from a glob pattern or a list; an empty result is an error naming `key`."""
    if spec is None:
        raise ValueError(f"data.{key}: no files given (a glob pattern or a list of paths)")
    if isinstance(spec, str):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise ValueError(f"data.{key}: the pattern '{spec}' matches no file")
        return paths
    missing = [p for p in spec if not Path(p).is_file()]
    if missing:
        raise ValueError(f"data.{key}: file not found: {missing[0]}")
    return list(spec)


# The arguments each optimizer and scheduler takes besides `type` (and the optimizer's learning_rate).
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
SCHEDULER_DEFAULTS = {"min_factor": 0.0, "step_size": 10, "gamma": 0.1, "factor": 0.1, "patience": 5,
                      "threshold": 1e-4}


def check_stage(name, settings):
    """ValueError naming the key when an optimizer or scheduler argument does not belong to its type."""
    for section, allowed, skip in (("optimizer", OPTIMIZER_ARGUMENTS, {"type", "learning_rate"}),
                                   ("scheduler", SCHEDULER_ARGUMENTS, {"type", "warmup_epochs"})):
        kind = settings[section]["type"]
        for key in set(settings[section]) - skip - allowed[kind]:
            raise ValueError(f"training.{name}.{section}.{key}: not an argument of {section} type '{kind}' "
                             f"(it takes {', '.join(sorted(allowed[kind])) or 'none'})")
    warmup = settings["scheduler"].get("warmup_epochs", 0)
    if warmup >= settings["epochs"]:
        raise ValueError(f"training.{name}.scheduler.warmup_epochs: {warmup} must be below epochs "
                         f"({settings['epochs']})")
