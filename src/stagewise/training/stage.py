"""One training stage: the data source, the model of the configured backend (torch flow or Keras
regression) and its recipe, the run, the stage model file and history."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import seeds
from ..config import INIT_STAGE, PROBLEM_KEYS, Problem, Settings, fingerprint, is_regression
from ..data import EpochBatches, EventBank
from ..files import read_torch_file, write_text
from ..models.posterior import PosteriorModel, load_flow_model
from ..priors import make_priors
from ..provenance import provenance
from ..sources import Source, inference_bundle, make_source
from ..svd import load_svd
from ..trafo import Trafo
from . import checkpoints
from .optim import TorchRecipe
from .ranks import ONE_PROCESS, Ranks
from .runner import Recipe, run_stage

log = logging.getLogger(__name__)

PROJECTION_SCALE_SAMPLES = 4096


@dataclass(frozen=True)
class StageSettings:
    """The settings of one stage, built once from its rule's settings (config.stage_settings)."""

    name: str  # "stage_1"
    seed: int
    problem: Problem
    model: Settings  # config `model`
    training: Settings  # config `training.<name>`
    shuffle: Settings  # config `data.shuffle`
    fingerprinted: Settings  # all of config.stage_settings: what the fingerprint and the model file carry

    @classmethod
    def from_settings(cls, settings: Settings, name: str) -> "StageSettings":
        return cls(name, settings["seed"], Problem.from_settings(settings), settings["model"],
                   settings["training"][name], settings["data"]["shuffle"], settings)


@dataclass(frozen=True)
class StageInputs:
    """The files a stage reads."""

    training_files: list[str]
    validation_files: list[str]
    trafo: str
    svd: dict[str, str]  # basis name (detector, or "inputs") -> svd_<name>.h5; empty with svd: null
    fiducial_asd: str | None  # None for observations
    asd_set: str | None
    previous_model: str | None  # the previous stage's model file; None for stage_0
    init_model: str | None = None  # GNPE: the init network's model file, which the stage model file carries

    def fingerprinted_files(self, warm_start: str | None) -> list[str]:
        """The upstream artefacts whose bytes enter the fingerprint."""
        start_from = self.previous_model or warm_start
        return [self.trafo, *self.svd.values()] + ([start_from] if start_from else [])


@dataclass(frozen=True)
class StageOutputs:
    model: str  # model_stage_<k>.pt, or .keras for gaussian_regression
    history: str  # history.csv


def architecture(stage: StageSettings, source: Source, first_layer_size: int) -> dict[str, Any]:
    return dict(
        num_detectors=source.num_channels, num_inputs=source.num_inputs,
        svd_size=first_layer_size, num_asd_features=source.num_asd_features,
        num_parameters=len(stage.problem.inference_parameters),
        embedding=stage.model["embedding"], flow=stage.model["flow"],
    )


def first_layer(stage: StageSettings, source: Source, svd_files: dict[str, str]) -> tuple[list[np.ndarray], dict]:
    """(the SVD bases, one per detector or none, and the model architecture): without SVD the
    first layer is an ordinary layer as wide as the first hidden layer."""
    bases = [load_svd(path)[0] for path in svd_files.values()]
    size = bases[0].shape[1] if bases else stage.model["embedding"]["hidden_dims"][0]
    return bases, architecture(stage, source, size)


def init_trafo(trafo: Trafo, problem: Problem) -> Trafo:
    """GNPE's init network: the trafo's input standardisation, and its label (the arrival time as measured,
    not aligned) standardised by the mean and standard deviation of its prior."""
    priors = make_priors({name: problem.priors[name] for name in problem.inference_parameters})
    return Trafo(priors, [p.mean() for p in priors.values()], [p.std() for p in priors.values()],
                 [False] * len(priors), trafo.input_mean, trafo.input_std, trafo.log_inputs)


def gnpe_bundle(kernel: float, init_model: str) -> dict[str, Any]:
    """What `infer` and `evaluate` need for GNPE besides the network: the kernel, and the init network
    (architecture, weights, its trafo) from its model file."""
    state = read_torch_file(init_model, "architecture")
    return {"kernel": kernel, "init": {"architecture": state["architecture"], "model": state["model"],
                                       "trafo": state["inference"]["trafo"]}}


def projection_inputs(seed: int, source: Source, trafo: Trafo, bank: EventBank) -> torch.Tensor:
    """Network inputs of up to PROJECTION_SCALE_SAMPLES training events (fiducial ASD), from which
    the first layer's output scale is set."""
    make = source.batch_maker(bank, trafo, "fiducial")
    count = min(PROJECTION_SCALE_SAMPLES, len(bank))
    return make(torch.arange(count, device=source.device),
                seeds.generator(seed, "projection_scale", device=source.device))[1]


def new_flow_model(stage: StageSettings, source: Source, trafo: Trafo, svd_files: dict[str, str],
                   bank: EventBank) -> PosteriorModel:
    """Stage 0's flow model: seeded weights, first layer seeded by the SVD bases, projection scale from data."""
    bases, arch = first_layer(stage, source, svd_files)
    torch.manual_seed(seeds.derived_seed(stage.seed, "model"))
    model = PosteriorModel(arch).to(source.device)
    if bases:
        model.embedding.seed_svd(bases)
    with torch.no_grad():
        scale = model.embedding.project(projection_inputs(stage.seed, source, trafo, bank)).std(0).clamp_min(1e-3)
        model.embedding.projection_scale.copy_(scale)
    return model


def warm_start(model: PosteriorModel, path: str) -> None:
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


class FlowBackend:
    """The torch flow: new (or warm-started) in stage 0, else the previous stage's; saved as .pt."""

    def recipe(self, stage: StageSettings, source: Source, trafo: Trafo, inputs: StageInputs, bank: EventBank,
               threads: int, ranks: Ranks) -> TorchRecipe:
        if inputs.previous_model is None:
            model = new_flow_model(stage, source, trafo, inputs.svd, bank)
            if stage.training["warm_start"] is not None:
                warm_start(model, stage.training["warm_start"])
        else:
            model, _ = load_flow_model(inputs.previous_model, source.device)
        model.embedding.freeze_svd(stage.training["freeze_svd"])
        return TorchRecipe(model, stage.training, ranks)

    def save(self, recipe: Recipe, weights: Any, path: str, info: dict[str, Any]) -> None:
        checkpoints.save(path, dict(info, model=weights))


class RegressionBackend:
    """The Keras Gaussian regression (model.type gaussian_regression), built as the flow is, saved as
    .keras. Only this backend imports TensorFlow; it trains on one rank (config.check_ranks)."""

    def recipe(self, stage: StageSettings, source: Source, trafo: Trafo, inputs: StageInputs, bank: EventBank,
               threads: int, ranks: Ranks) -> Recipe:
        from ..config import label_weights
        from ..models import regression
        from .keras_recipe import KerasRecipe

        regression.configure(threads, seeds.derived_seed(stage.seed, "model"))
        if inputs.previous_model is None:
            bases, arch = first_layer(stage, source, inputs.svd)
            model = regression.new_regression_model(arch)
            if bases:
                model.seed_svd(bases)
            coefficients = model.project(projection_inputs(stage.seed, source, trafo, bank).cpu().numpy()).numpy()
            model.projection_scale.assign(np.maximum(coefficients.std(0, ddof=1), 1e-3))
        else:
            model = regression.load_regression_model(inputs.previous_model)
        model.freeze_svd(stage.training["freeze_svd"])
        return KerasRecipe(model, stage.training, label_weights(stage.model, stage.problem.inference_parameters))

    def save(self, recipe: Recipe, weights: Any, path: str, info: dict[str, Any]) -> None:
        from ..models.regression import save_regression_model

        recipe.model.set_weights([np.asarray(w) for w in weights])  # tensors when read from model_best.pt
        save_regression_model(recipe.model, path, info)


def time_limit(local: Settings, job_runtime: int | None = None) -> float | None:
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


def train_stage(settings: Settings, local: Settings, name: str, inputs: StageInputs, outputs: StageOutputs,
                checkpoint_dir: str | Path, *, threads: int = 1, planned_stages: Settings | None = None,
                job_runtime: int | None = None, monitor: Any = None, intrinsic_prior: Settings | None = None,
                ranks: Ranks = ONE_PROCESS) -> None:
    """Train stage `name` (e.g. "stage_1") and write its model file and history.

    settings: config.stage_settings of the stage; local: the config's `local` section.
    planned_stages (the config's whole `training` section) is stored in the checkpoints for
    `stagewise ls` and `append-stage`; it is not part of the fingerprint.
    job_runtime: the cluster job's time limit in minutes (see time_limit), or None.
    monitor: None or a monitor.Monitor that follows the epochs (TensorBoard, W&B).
    intrinsic_prior: the config's, for the inference bundle of the model file (the priors `infer`
    weights with); like planned_stages, not part of the fingerprint.
    ranks: this process's rank of a data-parallel stage (parallel.py); rank 0 alone writes the files."""
    torch.set_num_threads(threads)
    stage = StageSettings.from_settings(settings, name)
    device = torch.device(local["device"])
    source = make_source(stage.problem, inputs.training_files[0], inputs.fiducial_asd, inputs.asd_set, device,
                         stage.model["num_asd_bands"])
    trafo = Trafo.load(inputs.trafo)
    if name == INIT_STAGE:
        trafo = init_trafo(trafo, stage.problem)
    bank, validation = (source.bank(files, stage.shuffle, local["memory_limit_mb"])
                        for files in (inputs.training_files, inputs.validation_files))
    backend = RegressionBackend() if is_regression(settings) else FlowBackend()
    recipe = backend.recipe(stage, source, trafo, inputs, bank, threads, ranks)
    batch_size, asd = stage.training["batch_size"], stage.training["asd"]
    train_batch, valid_batch = (source.batch_maker(b, trafo, asd) for b in (bank, validation))

    def train_batches(epoch: int) -> EpochBatches:
        generator = seeds.generator(stage.seed, name, "epoch", epoch, device=device)
        return bank.epoch(batch_size, generator, train_batch)

    def validation_batches() -> EpochBatches:
        generator = seeds.generator(stage.seed, name, "validation", device=device)
        indices = torch.split(torch.arange(len(validation), device=device), batch_size)
        return EpochBatches(indices, valid_batch, generator)

    stage_fingerprint = fingerprint(settings, inputs.fingerprinted_files(stage.training["warm_start"]))
    metadata = dict(stage=name, settings=settings, architecture=recipe.model.architecture, provenance=provenance(),
                    planned_stages=planned_stages or settings["training"])
    limits = local["runtime_limits"]
    history, weights, weights_epoch = run_stage(
        recipe, train_batches, validation_batches, stage.training["epochs"], checkpoint_dir,
        stage_fingerprint, metadata, local["checkpoint_epochs"], limits["max_epochs_per_run"],
        time_limit(local, job_runtime), stage.training["stage_model"], monitor, ranks,
    )
    if not ranks.main:
        return
    write_text(outputs.history, pd.DataFrame(history).to_csv(index=False))
    problem = {"data": {k: settings["data"][k] for k in ("kind", "simulate")}, "intrinsic_prior": intrinsic_prior or {},
               **{key: settings[key] for key in PROBLEM_KEYS}}
    bundle = inference_bundle(problem, source, trafo)
    if stage.problem.gnpe_kernel is not None:
        assert inputs.init_model is not None  # the workflow gives GNPE stages the init network's model file
        bundle["gnpe"] = gnpe_bundle(stage.problem.gnpe_kernel, inputs.init_model)
    backend.save(recipe, weights, outputs.model, dict(metadata, fingerprint=stage_fingerprint,
                                                      epoch=history[-1]["epoch"], weights_epoch=weights_epoch,
                                                      history=history, inference=bundle))
    log.info("stage %s done: %s", name, outputs.model)
