"""Snakemake adapter: simulate the toy problem's event and ASD files."""

from stagewise.logs import log_to_file
from stagewise.simulate.files import simulate

log_to_file(snakemake.log[0])
settings = snakemake.params.settings
simulate(
    settings["simulation"], settings["intrinsic_prior"], list(settings["detectors"]), settings["seed"],
    list(snakemake.output.events), snakemake.output.fiducial_asd, snakemake.output.asd_set,
)
