# One rule per stage of config["training"]: train_stage_0, train_stage_1, ...
# Checkpoints live in results/<run>/checkpoints/<stage>/, outside the declared
# outputs, so Snakemake never deletes them when a job fails.
for index, stage in enumerate(STAGES):

    rule:
        name:
            f"train_{stage}"
        input:
            trafo=rules.fit_trafo.output[0],
            svd=svd_files(),
            training=split_files("training"),
            validation=split_files("validation"),
            fiducial_asd=asd_file("fiducial_asd"),
            asd_set=asd_file("asd_set"),
            previous=([stage_model(STAGES[index - 1])] if index else []),
            warm_start=[
                path for path in [config["training"][stage]["warm_start"]] if path
            ],
        output:
            model=stage_model(stage),
            history=stage_dir(stage) / "history.csv",
        log:
            log_file(f"train_{stage}"),
        conda:
            ENV
        threads: config["local"]["threads"]
        resources:
            gpu=TRAINING_JOB["gpus"],  # SLURM
            request_gpus=TRAINING_JOB["gpus"],  # HTCondor
            mem_mb=TRAINING_JOB["mem_mb"],  # SLURM
            htcondor_request_mem_mb=TRAINING_JOB["mem_mb"],
            runtime=TRAINING_JOB["runtime"],  # SLURM, minutes
            allowed_job_duration=TRAINING_JOB["runtime"] * 60,  # HTCondor, seconds
        params:
            settings=settings.stage_settings(config, stage),
            stage=stage,
            checkpoint_dir=RUN / "checkpoints" / stage,
            tensorboard_dir=RUN / "tensorboard" / stage,
            local_settings=RUN / "local_settings.yaml",
        script:
            "../scripts/train_stage.py"
