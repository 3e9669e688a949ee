"""One training stage of the posterior model: data source, model, optimizer, run."""

import logging

import numpy as np
import pandas as pd
import torch

from .. import seeds
from ..config import fingerprint, stage_settings
from ..files import write_text
from ..models.posterior import PosteriorModel
from ..problem import is_regression
from ..provenance import provenance
from ..sources import make_source
from ..svd import load_svd
from ..trafo import Trafo
from . import checkpoints
from .batches import EpochBatches
from .optim import Recipe
from .runner import run_stage

log = logging.getLogger(__name__)

PROJECTION_SCALE_SAMPLES = 4096


def architecture(config, source, first_layer_size):
    return dict(
        num_detectors=source.num_channels, num_inputs=source.num_inputs,
        svd_size=first_layer_size, num_asd_features=source.num_asd_features,
        num_parameters=len(config["inference_parameters"]),
        embedding=config["model"]["embedding"], flow=config["model"]["flow"],
    )


def first_layer(config, source, svd_files):
    """(the SVD bases, one per detector or none, and the model architecture): without SVD the
    first layer is an ordinary layer as wide as the first hidden layer."""
    bases = [load_svd(path)[0] for path in svd_files]
    size = bases[0].shape[1] if bases else config["model"]["embedding"]["hidden_dims"][0]
    return bases, architecture(config, source, size)


def projection_inputs(config, source, trafo, bank):
    """Network inputs of up to PROJECTION_SCALE_SAMPLES training events (fiducial ASD), from which
    the first layer's output scale is set."""
    make = source.batch_maker(bank, trafo, "fiducial")
    count = min(PROJECTION_SCALE_SAMPLES, len(bank))
    return make(torch.arange(count, device=source.device),
                seeds.generator(config["seed"], "projection_scale", device=source.device))[1]


def new_model(config, source, trafo, svd_files, bank):
    """Stage 0's flow model: seeded weights, first layer seeded by the SVD bases, projection scale from data."""
    bases, arch = first_layer(config, source, svd_files)
    torch.manual_seed(seeds.derived_seed(config["seed"], "model"))
    model = PosteriorModel(arch).to(source.device)
    if bases:
        model.embedding.seed_svd(bases)
    with torch.no_grad():
        scale = model.embedding.project(projection_inputs(config, source, trafo, bank)).std(0).clamp_min(1e-3)
        model.embedding.projection_scale.copy_(scale)
    return model


def regression_recipe(config, settings, source, trafo, inputs, bank, threads):
    """The Keras model of `model.type: gaussian_regression` (built as new_model builds the flow's,
    or the previous stage's) and its recipe. Imports TensorFlow."""
    from ..models import regression

    regression.configure(threads, seeds.derived_seed(config["seed"], "model"))
    if inputs["previous_model"] is None:
        bases, arch = first_layer(config, source, inputs["svd"])
        model = regression.new_regression_model(arch)
        if bases:
            model.seed_svd(bases)
        coefficients = model.project(projection_inputs(config, source, trafo, bank).cpu().numpy()).numpy()
        model.projection_scale.assign(np.maximum(coefficients.std(0, ddof=1), 1e-3))
    else:
        model = regression.load_model(inputs["previous_model"])
    model.freeze_svd(settings["freeze_svd"])
    return regression.KerasRecipe(model, settings, regression.label_weights(config))


def load_model(path, device="cpu"):
    """(PosteriorModel, the model file's dict) from a stage model or checkpoint."""
    state = checkpoints.load(path)
    model = PosteriorModel(state["architecture"])
    model.load_state_dict(state["model"])
    return model.to(device), state


def warm_start(model, path):
    """Load the weights of another run's model file into `model`; a clear error when they do not fit."""
    state = checkpoints.load(path)
    ours = model.state_dict()
    theirs = state.get("model", {})
    for name in [*ours, *(k for k in theirs if k not in ours)]:
        if name not in theirs or name not in ours:
            where = "is missing there" if name not in theirs else "is not in this model"
            raise ValueError(f"training.stage_0.warm_start: {path}: parameter '{name}' {where}")
        if ours[name].shape != theirs[name].shape:
            raise ValueError(f"training.stage_0.warm_start: {path}: parameter '{name}' has shape "
                             f"{tuple(theirs[name].shape)} there but {tuple(ours[name].shape)} in this config's model")
    model.load_state_dict(theirs)
    log.info("stage_0 starts from the weights of %s (epoch %s)", path, state.get("epoch"))


def time_limit(local, job_runtime=None):
    """max_time_per_run (s) for this run: the configured one, or less inside a cluster job.

    job_runtime: the job's time limit in minutes when running as a cluster job, else None.
    The trainer then stops `training_job.stop_margin` seconds before the scheduler's kill."""
    limit = local["runtime_limits"]["max_time_per_run"]
    if job_runtime:
        derived = job_runtime * 60 - local["training_job"]["stop_margin"]
        if derived <= 0:
            log.warning("job runtime %s min is shorter than stop_margin %s s: relying on the scheduler's "
                        "SIGTERM to stop the trainer", job_runtime, local["training_job"]["stop_margin"])
        else:
            limit = derived if limit is None else min(limit, derived)
    return limit


def flow_model(config, settings, source, trafo, inputs, bank):
    """Stage 0's new (or warm-started) flow model, or the previous stage's, its SVD layer frozen as asked."""
    if inputs["previous_model"] is None:
        model = new_model(config, source, trafo, inputs["svd"], bank)
        if settings["warm_start"] is not None:
            warm_start(model, settings["warm_start"])
    else:
        model, _ = load_model(inputs["previous_model"], source.device)
    model.embedding.freeze_svd(settings["freeze_svd"])
    return model


def train_stage(config, stage, inputs, outputs, checkpoint_dir, threads=1, planned_stages=None, job_runtime=None,
                monitor=None):
    """Train stage `stage` (e.g. "stage_1") and write its model file and history.

    monitor: None or a monitor.Monitor that follows the epochs (TensorBoard, W&B).
    planned_stages (the config's whole `training` section) is stored in the
    checkpoints for `stagewise ls` and `append-stage`; it is not part of the fingerprint.
    job_runtime: the cluster job's time limit in minutes (see time_limit), or None.

    inputs: dict with training_files, validation_files, trafo, svd (list, one per
    detector), fiducial_asd, asd_set, previous_model (None for the first stage).
    outputs: dict with model, history."""
    torch.set_num_threads(threads)
    local = config["local"]
    settings = config["training"][stage]
    device = torch.device(local["device"])
    source = make_source(config, inputs["training_files"][0], inputs.get("fiducial_asd"), inputs.get("asd_set"),
                         device)
    trafo = Trafo.load(inputs["trafo"])
    bank, validation = source.bank(inputs["training_files"]), source.bank(inputs["validation_files"])
    if is_regression(config):
        recipe = regression_recipe(config, settings, source, trafo, inputs, bank, threads)
    else:
        recipe = Recipe(flow_model(config, settings, source, trafo, inputs, bank), settings)
    train_batch, valid_batch = (source.batch_maker(b, trafo, settings["asd"]) for b in (bank, validation))

    def train_batches(epoch):
        generator = seeds.generator(config["seed"], stage, "epoch", epoch, device=device)
        return bank.epoch(settings["batch_size"], generator, train_batch)

    def validation_batches():
        generator = seeds.generator(config["seed"], stage, "validation", device=device)
        indices = torch.split(torch.arange(len(validation), device=device), settings["batch_size"])
        return EpochBatches(indices, valid_batch, generator)

    model_settings = stage_settings(config, stage)
    start_from = inputs["previous_model"] or settings["warm_start"]
    input_files = [inputs["trafo"], *inputs["svd"]] + ([start_from] if start_from else [])
    stage_fingerprint = fingerprint(model_settings, input_files)
    metadata = dict(stage=stage, settings=model_settings, architecture=recipe.model.architecture, provenance=provenance(),
                    planned_stages=planned_stages or config["training"])
    limits = local["runtime_limits"]
    history, weights, weights_epoch = run_stage(
        recipe, train_batches, validation_batches, settings["epochs"], checkpoint_dir,
        stage_fingerprint, metadata, local["checkpoint_epochs"], limits["max_epochs_per_run"],
        time_limit(local, job_runtime), settings["stage_model"], monitor,
    )
    write_text(outputs["history"], pd.DataFrame(history).to_csv(index=False))
    final = dict(metadata, fingerprint=stage_fingerprint, epoch=history[-1]["epoch"], weights_epoch=weights_epoch,
                 history=history)
    if is_regression(config):
        from ..models import regression

        recipe.model.set_weights(weights)
        regression.save_model(recipe.model, outputs["model"], final)
    else:
        checkpoints.save(outputs["model"], dict(final, model=weights))
    log.info("stage %s done: %s", stage, outputs["model"])
