"""Snakemake adapter: fit the transformation model."""

from stagewise.logs import log_to_file
from stagewise.steps import fit_trafo_step

log_to_file(snakemake.log[0])
fit_trafo_step(snakemake.params.settings, list(snakemake.input.events), snakemake.input.fiducial_asd or None,
               snakemake.output[0])
