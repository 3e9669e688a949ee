rule fit_trafo:
    input:
        counts=ancient(rules.count_events.output[0]),
        events=split_files("trafo"),
        fiducial_asd=asd_file("fiducial_asd"),
    output:
        RUN / "trafo.h5",
    log:
        log_file("fit_trafo"),
    conda:
        ENV
    params:
        settings=settings.trafo_settings(config),
    script:
        "../scripts/fit_trafo.py"


rule build_svd:
    input:
        trafo=rules.fit_trafo.output[0],
        events=split_files("training"),
        fiducial_asd=asd_file("fiducial_asd"),
    output:
        **{detector: RUN / f"svd_{detector}.h5" for detector in config["detectors"]},
    log:
        log_file("build_svd"),
    conda:
        ENV
    params:
        settings=settings.svd_settings(config),
    script:
        "../scripts/build_svd.py"
