if config["data"]["simulate"]:

    rule simulate:
        output:
            events=[
                RUN / "data" / f"{split}_{i:02d}.h5"
                for split, count in config["simulation"]["num_files"].items()
                for i in range(count)
            ],
            fiducial_asd=asd_file("fiducial_asd"),
            asd_set=asd_file("asd_set"),
        log:
            log_file("simulate"),
        conda:
            ENV
        params:
            settings=settings.simulation_settings(config),
        script:
            "../scripts/simulate.py"


rule count_events:
    input:
        unpack(
            lambda wildcards: {split: split_files(split) for split in settings.SPLITS}
        ),
    output:
        COUNTS,
    log:
        log_file("count_events"),
    conda:
        ENV
    params:
        settings=settings.count_settings(config),
    script:
        "../scripts/count_events.py"
