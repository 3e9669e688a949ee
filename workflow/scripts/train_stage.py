"""Snakemake adapter: train one stage (resuming from its checkpoints)."""

import os
import sys

from stagewise.config import svd_names
from stagewise.logs import log_to_file
from stagewise.training.monitor import Monitor, write_local_settings
from stagewise.training.runner import StageStopped
from stagewise.training.stage import StageInputs, StageOutputs, train_stage

log_to_file(snakemake.log[0])
settings, local, stage = snakemake.params.settings, snakemake.config["local"], snakemake.params.stage
write_local_settings(snakemake.params.local_settings, local)
monitor = Monitor(snakemake.params.tensorboard_dir, stage, local["wandb"], snakemake.params.local_settings,
                  {**settings, "local": local})
inputs = StageInputs(
    training_files=list(snakemake.input.training), validation_files=list(snakemake.input.validation),
    trafo=snakemake.input.trafo,
    svd=dict(zip(svd_names(snakemake.config), snakemake.input.svd, strict=True)) if snakemake.input.svd else {},
    fiducial_asd=snakemake.input.fiducial_asd or None, asd_set=snakemake.input.asd_set or None,
    previous_model=snakemake.input.previous[0] if snakemake.input.previous else None,
    init_model=snakemake.input.init[0] if snakemake.input.init else None,
)
outputs = StageOutputs(model=snakemake.output.model, history=snakemake.output.history)
in_cluster_job = "SLURM_JOB_ID" in os.environ or "_CONDOR_JOB_AD" in os.environ
try:
    train_stage(settings, local, stage, inputs, outputs, snakemake.params.checkpoint_dir,
                threads=snakemake.threads, planned_stages=snakemake.config["training"],
                job_runtime=snakemake.resources.runtime if in_cluster_job else None, monitor=monitor,
                intrinsic_prior=snakemake.config["intrinsic_prior"])
except StageStopped as stop:
    sys.exit(stop.exit_code)
