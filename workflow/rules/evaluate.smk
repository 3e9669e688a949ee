rule evaluate:
    input:
        model=stage_dir(STAGES[-1]) / f"model_{STAGES[-1]}.pt",
        histories=[stage_dir(stage) / "history.csv" for stage in STAGES],
        trafo=rules.fit_trafo.output[0],
        test=split_files("test"),
        fiducial_asd=asd_file("fiducial_asd"),
        asd_set=asd_file("asd_set"),
        svd=svd_files(),
    output:
        metrics=RUN / "evaluation" / "metrics.json",
        metrics_table=report(
            RUN / "evaluation" / "metrics.html",
            caption="../report/metrics.rst",
            category="Evaluation",
        ),
        importance_sampling=RUN / "evaluation" / "importance_sampling.csv",
        loss_curves=report(
            RUN / "evaluation" / "loss_curves.png",
            caption="../report/loss_curves.rst",
            category="Evaluation",
        ),
        pp_plot=report(
            RUN / "evaluation" / "pp_plot.png",
            caption="../report/pp_plot.rst",
            category="Evaluation",
        ),
        corner=report(
            RUN / "evaluation" / "corner.png",
            caption="../report/corner.rst",
            category="Evaluation",
        ),
        svd_mismatch=report(
            RUN / "evaluation" / "svd_mismatch.png",
            caption="../report/svd_mismatch.rst",
            category="Evaluation",
        ),
        label_distributions=report(
            RUN / "evaluation" / "label_distributions.png",
            caption="../report/label_distributions.rst",
            category="Evaluation",
        ),
    log:
        log_file("evaluate"),
    conda:
        ENV
    threads: config["local"]["threads"]
    params:
        settings=settings.evaluation_settings(config),
        stages=STAGES,
        svd_names=SVD_NAMES,
    script:
        "../scripts/evaluate.py"
