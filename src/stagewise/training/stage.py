"""One training stage of the posterior model: data source, model, optimizer, run."""

import logging

import pandas as pd
import torch

from .. import seeds
from ..config import fingerprint, stage_settings
from ..files import write_text
from ..models.posterior import PosteriorModel
from ..provenance import provenance
from ..sources import make_source
from ..svd import load_svd
from ..trafo import Trafo
from . import checkpoints
from .batches import EpochBatches
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


def new_model(config, source, trafo, svd_files, bank):
    """Stage 0's model: seeded weights, first layer seeded by the SVD bases (or, without
    SVD, an ordinary layer as wide as the first hidden layer), projection scale from data."""
    bases = [load_svd(path)[0] for path in svd_files]
    first_layer_size = bases[0].shape[1] if bases else config["model"]["embedding"]["hidden_dims"][0]
    torch.manual_seed(seeds.derived_seed(config["seed"], "model"))
    model = PosteriorModel(architecture(config, source, first_layer_size)).to(source.device)
    if bases:
        model.embedding.seed_svd(bases)
    make = source.batch_maker(bank, trafo, "fiducial")
    count = min(PROJECTION_SCALE_SAMPLES, len(bank))
    _, strain, _ = make(torch.arange(count, device=source.device),
                        seeds.generator(config["seed"], "projection_scale", device=source.device))
    with torch.no_grad():
        scale = model.embedding.project(strain).std(0).clamp_min(1e-3)
        model.embedding.projection_scale.copy_(scale)
    return model


def load_model(path, device="cpu"):
    """(PosteriorModel, the model file's dict) from a stage model or checkpoint."""
    state = checkpoints.load(path)
    model = PosteriorModel(state["architecture"])
    model.load_state_dict(state["model"])
    return model.to(device), state


def make_optimizer(model, settings, epochs):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=settings["optimizer"]["learning_rate"])
    if settings["scheduler"]["type"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    return optimizer, scheduler


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


def train_stage(config, stage, inputs, outputs, checkpoint_dir, threads=1, planned_stages=None, job_runtime=None):
    """Train stage `stage` (e.g. "stage_1") and write its model file and history.

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
    if inputs["previous_model"] is None:
        model = new_model(config, source, trafo, inputs["svd"], bank)
    else:
        model, _ = load_model(inputs["previous_model"], device)
    model.embedding.freeze_svd(settings["freeze_svd"])
    optimizer, scheduler = make_optimizer(model, settings, settings["epochs"])
    train_batch, valid_batch = (source.batch_maker(b, trafo, settings["asd"]) for b in (bank, validation))

    def train_batches(epoch):
        generator = seeds.generator(config["seed"], stage, "epoch", epoch, device=device)
        return bank.epoch(settings["batch_size"], generator, train_batch)

    def validation_batches():
        generator = seeds.generator(config["seed"], stage, "validation", device=device)
        indices = torch.split(torch.arange(len(validation), device=device), settings["batch_size"])
        return EpochBatches(indices, valid_batch, generator)

    model_settings = stage_settings(config, stage)
    input_files = [inputs["trafo"], *inputs["svd"]] + ([inputs["previous_model"]] if inputs["previous_model"] else [])
    stage_fingerprint = fingerprint(model_settings, input_files)
    metadata = dict(stage=stage, settings=model_settings, architecture=model.architecture, provenance=provenance(),
                    planned_stages=planned_stages or config["training"])
    limits = local["runtime_limits"]
    history = run_stage(
        model, optimizer, scheduler, train_batches, validation_batches, settings["epochs"], checkpoint_dir,
        stage_fingerprint, metadata, local["checkpoint_epochs"],
        limits["max_epochs_per_run"], time_limit(local, job_runtime),
    )
    write_text(outputs["history"], pd.DataFrame(history).to_csv(index=False))
    final = dict(metadata, fingerprint=stage_fingerprint, epoch=history[-1]["epoch"], history=history,
                 model=model.state_dict())
    checkpoints.save(outputs["model"], final)
    log.info("stage %s done: %s", stage, outputs["model"])
