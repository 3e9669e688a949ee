"""Snakemake adapter: train one stage (resuming from its checkpoints)."""

import os
import sys

from stagewise.logs import log_to_file
from stagewise.training.monitor import Monitor, write_local_settings
from stagewise.training.runner import StageStopped
from stagewise.training.stage import train_stage

log_to_file(snakemake.log[0])
config = {**snakemake.params.settings, "local": snakemake.config["local"]}
write_local_settings(snakemake.params.local_settings, config["local"])
stage = snakemake.params.stage
monitor = Monitor(snakemake.params.tensorboard_dir, stage, config["local"]["wandb"], snakemake.params.local_settings,
                  config)
inputs = dict(
    training_files=list(snakemake.input.training), validation_files=list(snakemake.input.validation),
    trafo=snakemake.input.trafo, svd=list(snakemake.input.svd), fiducial_asd=snakemake.input.fiducial_asd or None,
    asd_set=snakemake.input.asd_set or None, previous_model=snakemake.input.previous[0] if snakemake.input.previous else None,
)
in_cluster_job = "SLURM_JOB_ID" in os.environ or "_CONDOR_JOB_AD" in os.environ
try:
    train_stage(config, stage, inputs, dict(snakemake.output.items()), snakemake.params.checkpoint_dir,
                snakemake.threads, snakemake.config["training"], snakemake.resources.runtime if in_cluster_job else None,
                monitor)
except StageStopped as stop:
    sys.exit(stop.exit_code)
