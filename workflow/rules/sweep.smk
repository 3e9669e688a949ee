# A sweep (the config key sweep names a sweep file; stagewise.sweep reads it): every run is a module of
# run.smk with the run's config, its rule names prefixed by the run's name (lr_1e-4: lr_1e_4__evaluate);
# a step that runs compute alike is defined only in the first of them. The rule sweep trains and
# evaluates every run and compares them.
from stagewise.sweep import load_sweep, no_sweep_file

if config["sweep"] is not None:
    SWEEP_NAME, SWEEP_RUNS = load_sweep(config["sweep"], config)
    SWEEP_DIR = Path("results") / SWEEP_NAME
    SWEEP_TABLE = [sweep_run.summary() for sweep_run in SWEEP_RUNS]

    for sweep_run in SWEEP_RUNS:
        run_module = f"sweep_run_{sweep_run.rule_prefix}"

        module:
            name: run_module
            snakefile:
                "../run.smk"
            config:
                sweep_run.module_config()

        # `use rule * from <module> exclude <the steps it borrows> as <prefix>*`, whose rule list Snakemake's
        # syntax takes only as literal names: the call that statement compiles to.
        workflow.userule(
            rules=["*"],
            from_module=run_module,
            exclude_rules=sweep_run.borrowed_steps(),
            name_modifier=f"{sweep_run.rule_prefix}*",
            lineno=0,
        )(lambda: None)

    rule sweep:
        input:
            [row["metrics"] for row in SWEEP_TABLE],
            [path for row in SWEEP_TABLE for path in row["histories"].values()],
        output:
            table=SWEEP_DIR / "comparison.csv",
            by_setting=SWEEP_DIR / "comparison_by_setting.csv",
            html=report(
                SWEEP_DIR / "comparison.html",
                caption="../report/comparison.rst",
                category=f"Sweep {SWEEP_NAME}",
            ),
            curves=report(
                SWEEP_DIR / "validation_loss.png",
                caption="../report/validation_loss.rst",
                category=f"Sweep {SWEEP_NAME}",
            ),
        log:
            str(SWEEP_DIR / "logs" / "compare_runs.log"),
        conda:
            ENV
        params:
            runs=SWEEP_TABLE,
        script:
            "../scripts/compare_runs.py"

else:

    rule sweep:
        input:
            no_sweep_file,
