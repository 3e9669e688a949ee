# The rules of one run: the Snakefile includes them for the config's run, and sweep.smk loads them as
# a module for every run of a sweep (each with its own config and rule-name prefix).
include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/infer.smk"
