"""Snakemake adapter: posteriors (or predictions) of one observed set from the last stage's model."""

import torch

from stagewise.infer import InferenceSettings, infer
from stagewise.logs import log_to_file

log_to_file(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
infer(snakemake.input.model, list(snakemake.input.events), snakemake.params.outdir,
      InferenceSettings.from_settings(snakemake.params.settings), snakemake.config["local"]["device"])
