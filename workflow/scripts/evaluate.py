"""Snakemake adapter: evaluate the last stage's model."""

from pathlib import Path

from stagewise.evaluate.run import EvaluationInputs, evaluate
from stagewise.logs import log_to_file

log_to_file(snakemake.log[0])
inputs = EvaluationInputs(
    model=snakemake.input.model, histories=dict(zip(snakemake.params.stages, snakemake.input.histories, strict=True)),
    trafo=snakemake.input.trafo, test_files=list(snakemake.input.test),
    fiducial_asd=snakemake.input.fiducial_asd or None, asd_set=snakemake.input.asd_set or None,
    svd=dict(zip(snakemake.params.svd_names, snakemake.input.svd, strict=True)),
    compare=dict(zip(snakemake.params.compare_runs, snakemake.input.compare, strict=True)),
)
evaluate(snakemake.params.settings, snakemake.config["local"], inputs, Path(snakemake.output.metrics).parent,
         snakemake.threads)
