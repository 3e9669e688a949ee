"""Snakemake adapter: the comparison of a sweep's runs (table, table by setting, HTML, validation loss)."""

import json
from pathlib import Path

from stagewise.config import INIT_STAGE
from stagewise.evaluate.plots import validation_curves
from stagewise.evaluate.run import read_history
from stagewise.files import atomic_path, write_text
from stagewise.logs import log_to_file
from stagewise.sweep import comparison_tables, run_row

log_to_file(snakemake.log[0])
runs = snakemake.params.runs
histories = [{stage: read_history(path) for stage, path in run["histories"].items()} for run in runs]
rows = [run_row(run, json.loads(Path(run["metrics"]).read_text()), h) for run, h in zip(runs, histories, strict=True)]
table, by_setting = comparison_tables(rows)
for frame, path in ((table, snakemake.output.table), (by_setting, snakemake.output.by_setting)):
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
html = (f"<h3>Every run, by test loss</h3>{table.to_html(index=False, float_format='{:.4g}'.format)}"
        f"<h3>Every setting: mean and standard deviation over its seed replicas</h3>"
        f"{by_setting.to_html(index=False, float_format='{:.4g}'.format)}")
write_text(snakemake.output.html, f"<html><body>{html}</body></html>\n")
stages = [(run["name"], run["group"], [h[stage] for stage in h if stage != INIT_STAGE])  # init: another problem
          for run, h in zip(runs, histories, strict=True)]
validation_curves(stages, snakemake.output.curves)
