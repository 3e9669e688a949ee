# Posteriors of observed events: one job per set of inference.sets (plus the simulated set of the
# embedded problem), from the last stage's model file. `snakemake infer` builds them all.
INFERENCE = place("infer_set") / "inference"
OBSERVED = place("simulate_observed") / "data" / "observed.h5"
INFERENCE_SETS = settings.inference_sets(config, str(OBSERVED))


if settings.SIMULATED_SET in INFERENCE_SETS:

    rule simulate_observed:
        input:
            fiducial_asd=asd_file("fiducial_asd"),
            asd_set=asd_file("asd_set"),
        output:
            OBSERVED,
        log:
            log_file("simulate_observed"),
        conda:
            ENV
        params:
            settings=settings.observed_simulation_settings(config),
        script:
            "../scripts/simulate_observed.py"


# One GPU (SLURM's gpu, HTCondor's request_gpus) when the model runs on one, else none asked.
INFER_GPU = (
    {"gpu": 1, "request_gpus": 1}
    if config["local"]["device"].startswith("cuda")
    else {}
)
INFER_OUTPUTS = dict(
    posterior=INFERENCE / "{set}" / "posterior.h5",
    summary=report(
        INFERENCE / "{set}" / "summary.csv",
        caption="../report/summary.rst",
        **report_group("Inference", "{set}"),
    ),
)
if not settings.is_regression(config):
    INFER_OUTPUTS["corner"] = report(
        INFERENCE / "{set}" / "corner.png",
        caption="../report/infer_corner.rst",
        **report_group("Inference", "{set}"),
    )


rule infer_set:
    input:
        model=stage_model(STAGES[-1]),
        events=lambda wildcards: INFERENCE_SETS[wildcards.set],
    output:
        **INFER_OUTPUTS,
    log:
        str(RUN / "logs" / "infer_{set}.log"),
    wildcard_constraints:
        set="|".join(INFERENCE_SETS) or "no-set",
    conda:
        ENV
    threads: config["local"]["threads"]
    resources:
        **INFER_GPU,
    params:
        settings=settings.inference_settings(config),
        outdir=lambda wildcards: str(INFERENCE / wildcards.set),
    script:
        "../scripts/infer.py"


rule infer:
    input:
        [
            INFERENCE / name / file
            for name in INFERENCE_SETS
            for file in ("posterior.h5", "summary.csv")
            + (() if settings.is_regression(config) else ("corner.png",))
        ],
