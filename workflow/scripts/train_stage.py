"""Snakemake adapter: train one stage (resuming from its checkpoints)."""

import os
import sys

from pathlib import Path

import yaml

from stagewise.files import write_yaml
from stagewise.logs import log_to_file
from stagewise.training.monitor import Monitor
from stagewise.training.runner import StageStopped
from stagewise.training.stage import train_stage

log_to_file(snakemake.log[0])
config = {**snakemake.params.settings, "local": snakemake.config["local"]}
local_settings = Path(snakemake.params.local_settings)
kept = yaml.safe_load(local_settings.read_text()) if local_settings.exists() else None
write_yaml(local_settings, config["local"] | {"wandb_run_ids": (kept or {}).get("wandb_run_ids", {})})
stage = snakemake.params.stage
monitor = Monitor(snakemake.params.tensorboard_dir, stage, config["local"]["wandb"], local_settings, config)
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
