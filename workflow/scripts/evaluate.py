"""Snakemake adapter: evaluate the last stage's model."""

from pathlib import Path

from stagewise.evaluate.run import evaluate, evaluate_regression
from stagewise.logs import log_to_file
from stagewise.problem import is_regression

log_to_file(snakemake.log[0])
config = {**snakemake.params.settings, "local": snakemake.config["local"]}
inputs = dict(
    model=snakemake.input.model, histories=dict(zip(snakemake.params.stages, snakemake.input.histories)),
    trafo=snakemake.input.trafo, test_files=list(snakemake.input.test),
    fiducial_asd=snakemake.input.fiducial_asd or None, asd_set=snakemake.input.asd_set or None,
    svd=dict(zip(snakemake.params.svd_names, snakemake.input.svd)),
    compare=dict(zip(snakemake.params.compare_runs, snakemake.input.compare)),
)
run = evaluate_regression if is_regression(config) else evaluate
run(config, inputs, Path(snakemake.output.metrics).parent, snakemake.threads)
