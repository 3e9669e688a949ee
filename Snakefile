from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/run.smk"
include: "workflow/rules/sweep.smk"


rule all:
    default_target: True
    input:
        rules.evaluate.output,
        rules.infer.input,
