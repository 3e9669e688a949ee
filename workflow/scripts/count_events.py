"""Snakemake adapter: count the events of every split."""

from stagewise.config import SPLITS
from stagewise.logs import log_to_file
from stagewise.steps import count_events_step

log_to_file(snakemake.log[0])
splits = {split: list(snakemake.input[split]) for split in SPLITS}
count_events_step(snakemake.params.settings, splits, snakemake.output[0])
