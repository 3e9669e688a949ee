"""Snakemake adapter: train one stage (resuming from its checkpoints), on one process or several ranks."""

import os
import sys

from stagewise.config import svd_names
from stagewise.logs import log_to_file
from stagewise.training.monitor import write_local_settings
from stagewise.training.parallel import run_training_job
from stagewise.training.stage import StageInputs, StageOutputs

log_to_file(snakemake.log[0])
settings, local, stage = snakemake.params.settings, snakemake.config["local"], snakemake.params.stage
write_local_settings(snakemake.params.local_settings, local)
monitor = dict(log_dir=snakemake.params.tensorboard_dir, stage=stage, wandb_settings=local["wandb"],
               local_settings=snakemake.params.local_settings, run_config={**settings, "local": local})
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
job = dict(settings=settings, local=local, name=stage, inputs=inputs, outputs=outputs,
           checkpoint_dir=snakemake.params.checkpoint_dir, threads=snakemake.threads,
           planned_stages=snakemake.config["training"],
           job_runtime=snakemake.resources.runtime if in_cluster_job else None,
           intrinsic_prior=snakemake.config["intrinsic_prior"])
sys.exit(run_training_job(job, monitor, snakemake.log[0]))
