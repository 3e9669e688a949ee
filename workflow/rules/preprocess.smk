rule fit_trafo:
    input:
        counts=ancient(COUNTS),
        events=split_files("trafo"),
        fiducial_asd=asd_file("fiducial_asd"),
    output:
        TRAFO,
    log:
        log_file("fit_trafo"),
    conda:
        ENV
    params:
        settings=settings.trafo_settings(config),
    script:
        "../scripts/fit_trafo.py"


if SVD_NAMES:

    rule build_svd:
        input:
            trafo=TRAFO,
            events=split_files("training"),
            fiducial_asd=asd_file("fiducial_asd"),
        output:
            **dict(zip(SVD_NAMES, svd_files())),
        log:
            log_file("build_svd"),
        conda:
            ENV
        params:
            settings=settings.svd_settings(config),
        script:
            "../scripts/build_svd.py"
