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
        loss_curves=RUN / "evaluation" / "loss_curves.png",
        pp_plot=RUN / "evaluation" / "pp_plot.png",
        posteriors=RUN / "evaluation" / "posteriors.png",
    log:
        log_file("evaluate"),
    conda:
        ENV
    threads: workflow.cores
    params:
        settings=settings.evaluation_settings(config),
        stages=STAGES,
    script:
        "../scripts/evaluate.py"
