"""Snakemake adapter: simulate the toy problem's event and ASD files."""

from stagewise.logs import log_to_file
from stagewise.simulate.files import simulate

log_to_file(snakemake.log[0])
simulate(snakemake.params.settings, list(snakemake.output.events), snakemake.output.fiducial_asd,
         snakemake.output.asd_set)
