"""Snakemake adapter: the simulated observed set (events to infer, with their truths)."""

from stagewise.logs import log_to_file
from stagewise.steps import simulate_observed_step

log_to_file(snakemake.log[0])
simulate_observed_step(snakemake.params.settings, snakemake.input.fiducial_asd, snakemake.input.asd_set,
                       snakemake.output[0])
