rule evaluate:
    input:
        model=stage_dir(STAGES[-1]) / f"model_{STAGES[-1]}.pt",
        histories=[stage_dir(stage) / "history.csv" for stage in STAGES],
        trafo=rules.fit_trafo.output[0],
        test=split_files("test"),
        fiducial_asd=asd_file("fiducial_asd"),
        asd_set=asd_file("asd_set"),
    output:
        metrics=RUN / "evaluation" / "metrics.json",
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
        posteriors=report(
            RUN / "evaluation" / "posteriors.png",
            caption="../report/posteriors.rst",
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
    script:
        "../scripts/evaluate.py"
