"""Snakemake adapter: build the SVD basis of each detector."""

from stagewise.logs import log_to_file
from stagewise.steps import build_svd_step

log_to_file(snakemake.log[0])
build_svd_step(snakemake.params.settings, list(snakemake.input.events), snakemake.input.fiducial_asd or None,
               snakemake.input.trafo, dict(snakemake.output.items()))
