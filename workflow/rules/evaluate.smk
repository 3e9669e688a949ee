# The evaluation's files: every model type writes the metrics and the common plots; the flow
# (a posterior) also P-P, corner plots and importance sampling.
EVALUATION = place("evaluate") / "evaluation"
EVALUATION_OUTPUTS = dict(
    metrics=EVALUATION / "metrics.json",
    metrics_table=report(
        EVALUATION / "metrics.html",
        caption="../report/metrics.rst",
        **report_group("Evaluation"),
    ),
    **{
        name: report(
            EVALUATION / f"{name}.png",
            caption=f"../report/{name}.rst",
            **report_group("Evaluation"),
        )
        for name in (
            "loss_curves",
            "pulls",
            "svd_mismatch",
            "label_distributions",
        )
    },
)
if not settings.is_regression(config):
    EVALUATION_OUTPUTS.update(
        importance_sampling=EVALUATION / "importance_sampling.csv",
        **{
            name: report(
                EVALUATION / f"{name}.png",
                caption=f"../report/{name}.rst",
                **report_group("Evaluation"),
            )
            for name in (
                "pp_plot",
                "corner",
                "network_vs_exact",
                "network_vs_exact_worst",
            )
        },
    )
if GNPE:
    EVALUATION_OUTPUTS.update(
        gnpe=EVALUATION / "gnpe.csv",
        **{
            name: report(
                EVALUATION / f"{name}.png",
                caption=f"../report/{name}.rst",
                **report_group("Evaluation"),
            )
            for name in ("gnpe_iterations", "time_posterior")
        },
    )


rule evaluate:
    input:
        model=stage_model(STAGES[-1]),
        histories=[stage_dir(stage) / "history.csv" for stage in STAGES],
        trafo=TRAFO,
        test=split_files("test"),
        fiducial_asd=asd_file("fiducial_asd"),
        asd_set=asd_file("asd_set"),
        svd=svd_files(),
        compare=[
            Path("results") / run / "evaluation" / "metrics.json"
            for run in config["evaluation"]["compare_runs"]
        ],
    output:
        **EVALUATION_OUTPUTS,
    log:
        log_file("evaluate"),
    conda:
        ENV
    threads: config["local"]["threads"]
    params:
        settings=settings.evaluation_settings(config),
        stages=STAGES,
        svd_names=SVD_NAMES,
        compare_runs=config["evaluation"]["compare_runs"],
    script:
        "../scripts/evaluate.py"
