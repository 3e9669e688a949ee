# One rule per stage of config["training"]: train_stage_0, train_stage_1, ...; with GNPE first
# train_init, the network of the initial time proxies, whose model file every stage model carries
# (TRAINED, stage_inputs: common.smk). Checkpoints live in results/<run>/checkpoints/<stage>/,
# outside the declared outputs, so Snakemake never deletes them when a job fails.
for stage in TRAINED:

    rule:
        name:
            f"train_{stage}"
        input:
            **stage_inputs(stage),
            trafo=TRAFO,
            training=split_files("training"),
            validation=split_files("validation"),
            fiducial_asd=asd_file("fiducial_asd"),
            asd_set=asd_file("asd_set"),
        output:
            model=stage_model(stage),
            history=stage_dir(stage) / "history.csv",
        log:
            log_file(f"train_{stage}"),
        conda:
            ENV
        threads: config["local"]["threads"]
        resources:
            gpu=TRAINING_JOB["gpus"],  # SLURM: one task that sees all of them (parallel.py starts the ranks)
            tasks_per_gpu=0,  # SLURM: never one task per GPU
            request_gpus=TRAINING_JOB["gpus"],  # HTCondor
            mem_mb=TRAINING_JOB["mem_mb"],  # SLURM
            htcondor_request_mem_mb=TRAINING_JOB["mem_mb"],
            runtime=TRAINING_JOB["runtime"],  # SLURM, minutes
            allowed_job_duration=TRAINING_JOB["runtime"] * 60,  # HTCondor, seconds
        params:
            settings=(
                settings.init_settings(config)
                if stage == INIT
                else settings.stage_settings(config, stage)
            ),
            stage=stage,
            checkpoint_dir=RUN / "checkpoints" / stage,
            tensorboard_dir=RUN / "tensorboard" / stage,
            local_settings=RUN / "local_settings.yaml",
        script:
            "../scripts/train_stage.py"
